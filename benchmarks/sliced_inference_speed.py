"""Throughput of `synthgen detect` (sliced inference) on the real pelican drone frame.

Measures seconds per frame and tiles per second for a yolov8n (random init: speed does not depend
on the weights) at a few tile sizes, and writes benchmarks/results/sliced_inference_speed.{json,md}.
Run: python benchmarks/sliced_inference_speed.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from detection.infer import SliceConfig, detect, tile_origins
from detection.train import make_ultralytics_offline
from synthgen.io_utils import atomic_write, write_json

REPO = Path(__file__).resolve().parents[1]
FRAME = REPO.parent / "shared" / "data" / "geo" / "AWPE_Pigeon_Lake_2020_DJI_0005.JPG"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ultralytics import YOLO

    make_ultralytics_offline()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "yolov8n.pt"
        YOLO("yolov8n.yaml").save(model)
        for tile in (320, 640):
            cfg = SliceConfig(tile=tile, overlap=0.2, batch=8, conf=0.25)
            n_tiles = len(tile_origins(1058, tile, 0.2)) * len(tile_origins(997, tile, 0.2))
            detect(model, FRAME, Path(d) / "warm", cfg, device=args.device, progress=False)  # warm-up
            times = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                detect(model, FRAME, Path(d) / f"r{tile}-{i}", cfg, device=args.device, progress=False)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append({"tile": tile, "tiles": n_tiles, "seconds_per_frame": round(best, 3),
                         "tiles_per_second": round(n_tiles / best, 1)})
    out = REPO / "benchmarks" / "results"
    meta = {"frame": FRAME.name, "size": [1058, 997], "model": "yolov8n (random init)", "device": args.device,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "note": "includes model load and CSV/COCO writing; best of repeats; on a shared machine, other jobs may be running", "rows": rows}
    write_json(out / "sliced_inference_speed.json", meta)
    md = ["| tile | tiles/frame | s/frame | tiles/s |", "|---|---|---|---|"]
    md += [f"| {r['tile']} | {r['tiles']} | {r['seconds_per_frame']} | {r['tiles_per_second']} |" for r in rows]
    with atomic_write(out / "sliced_inference_speed.md") as f:
        f.write(f"Sliced inference, {FRAME.name}, yolov8n, device {args.device}, "
                f"{meta['threads']} threads\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"-> {out / 'sliced_inference_speed.md'}")


if __name__ == "__main__":
    main()

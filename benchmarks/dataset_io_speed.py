"""Speed of dataset reading (header reads vs full decode) and chip cutting on the shared data.

Why: `read_dataset` reads image sizes from headers so `synthgen data inspect` stays fast on big
datasets; this measures what that buys against `--verify`, and the chips/second of `data chips`.
Writes benchmarks/results/dataset_io_speed.{json,md}.
Run: python benchmarks/dataset_io_speed.py [--chip-images 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from detection import read_dataset
from detection.chips import ChipConfig, make_chips
from synthgen.io_utils import atomic_write, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chip-images", type=int, default=100, help="train images to cut chips from, per dataset")
    args = ap.parse_args()
    rows = []
    for name in ("aquarium", "glacierbay-seals"):
        t0 = time.perf_counter()
        ds = read_dataset(DATA / name)
        t_head = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_dataset(DATA / name, verify=True)
        t_verify = time.perf_counter() - t0
        train = ds.subset("train")
        sub = train.subset(images=sorted(train.images.image_path)[: args.chip_images])
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            s = make_chips(sub, d, ChipConfig(size=64, margin=0.15), progress=False)
            t_chips = time.perf_counter() - t0
        rows.append({"dataset": name, "images": len(ds.images), "boxes": len(ds.boxes),
                     "read_headers_s": round(t_head, 2), "read_verify_s": round(t_verify, 2),
                     "images_per_s_headers": round(len(ds.images) / t_head, 1),
                     "images_per_s_verify": round(len(ds.images) / t_verify, 1),
                     "chip_images": len(sub.images), "chips": s["written"], "chips_s": round(t_chips, 2),
                     "chips_per_s": round(s["written"] / t_chips, 1)})
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    write_json(OUT / "dataset_io_speed.json", {"meta": meta, "rows": rows})
    with atomic_write(OUT / "dataset_io_speed.md") as f:
        f.write(f"# Dataset I/O speed\n\n{meta['machine']}, {meta['cpus']} CPUs (shared with other jobs)\n\n"
                "| dataset | images | boxes | read (headers) s | read (--verify) s | chips | chips/s |\n"
                "|---|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['dataset']} | {r['images']} | {r['boxes']} | {r['read_headers_s']} | {r['read_verify_s']} "
                    f"| {r['chips']} | {r['chips_per_s']} |\n")
    print(f"{len(rows)} datasets measured -> {OUT / 'dataset_io_speed.md'}")


if __name__ == "__main__":
    main()

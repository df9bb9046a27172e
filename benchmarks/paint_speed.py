"""Painting speed: tiles/s when augment-dataset paints five seals into each 640 px tile with the
in-context model, beside today's compose (paste pool chips) at the same settings, in one run.

    python benchmarks/paint_speed.py --generator models/glacierbay-seals-incontext --tiles 8 \\
        --out benchmarks/results/paint_speed_cpu
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from synthgen.compose import augment_dataset
from synthgen.compose.config import ComposeConfig
from synthgen.io_utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--data", default="../shared/data/glacierbay-seals/data.yaml")
    ap.add_argument("--compose", default="configs/compose/glacierbay-seals.yaml")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--instances", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from detection.chips import ChipConfig, make_chips
    from synthgen.incontext.generator import PaintConfig

    cfg = ComposeConfig.from_yaml(args.compose)
    cfg = cfg.model_copy(update={"count": cfg.count.model_copy(update={"distribution": "uniform", "low": args.instances,
                                                                         "high": args.instances, "max": args.instances}),
                                 "habitat": cfg.habitat.model_copy(update={"kind": "none"})})
    work = Path(tempfile.mkdtemp(prefix="paint_speed_"))
    try:
        make_chips(args.data, work / "chips", ChipConfig(size=64, max_per_class=64), split="val")
        runs = {}
        for name, kw in [("paste (compose, real chips)", {"pools": [work / "chips"]}),
                         ("paint (in-context)", {"pools": [], "generator": args.generator,
                                                 "paint": PaintConfig(steps=args.steps, device="cpu")})]:
            t0 = time.perf_counter()
            r = augment_dataset(args.data, out=work / name.split()[0], config=cfg, n_images=args.tiles, **kw)
            dt = time.perf_counter() - t0
            runs[name] = {"tiles": r.n_tiles, "instances": r.n_pasted, "seconds": round(dt, 2),
                          "tiles_per_s": round(r.n_tiles / dt, 4)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"threads": args.threads, "instances_per_tile": args.instances, "steps": args.steps,
           "cpu": platform.processor() or platform.machine(), "runs": runs}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    paste, paint = runs["paste (compose, real chips)"], runs["paint (in-context)"]
    lines = [f"# Painting speed ({args.threads} CPU threads, {args.instances} animals per 640 px tile, "
             f"{args.steps} DDIM steps)", "", "| route | tiles | animals | s | tiles/s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['tiles']} | {v['instances']} | {v['seconds']} | {v['tiles_per_s']} |" for k, v in runs.items()]
    lines += ["", f"Painting runs at {paint['tiles_per_s'] / paste['tiles_per_s']:.3f}x the paste route's tile rate "
                  "(same run; the paste route includes its mask stage)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"paint {paint['tiles_per_s']} tiles/s, paste {paste['tiles_per_s']} tiles/s -> {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

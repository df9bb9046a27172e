"""Compositor throughput: tiles/s for 640 px seal tiles with 5 pasted instances each, per blend
mode and mixed, through the real hot path (read tile, paste, albumentations, JPEG write) with a
process pool. Masks are computed once beforehand (cached, as in a real rerun).

    python benchmarks/compose_speed.py --tiles 80 --workers 2

Writes benchmarks/results/compose_speed.json and compose_speed.md. Other jobs share the CPU:
the 1-minute load average at start and end is recorded with the figures, and each tile's CPU time
in its worker is measured too, so a busy machine does not hide what the code itself costs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEALS = REPO.parent / "shared" / "data" / "glacierbay-seals"
MODES = {"hard": {"hard": 1.0}, "feather": {"feather": 1.0}, "gaussian": {"gaussian": 1.0},
         "poisson": {"poisson": 1.0}, "mixed (no poisson)": {"hard": 0.2, "feather": 0.4, "gaussian": 0.4},
         "mixed (5% poisson)": {"hard": 0.2, "feather": 0.4, "gaussian": 0.35, "poisson": 0.05}}


def _timed(job: dict) -> tuple[dict, float]:
    """compose_tile plus the CPU time it used in its worker (robust to other jobs on the machine)."""
    from synthgen.compose.pipeline import compose_tile

    c0 = time.process_time()
    res = compose_tile(job)
    return res, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=80)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips
    from synthgen.compose import ComposeConfig
    from synthgen.compose.pipeline import _init_worker, _jobs, _mask_job, _run, load_pool
    from synthgen.compose.scale import DatasetSizes

    ds = read_dataset(SEALS, splits=["train"])
    work = Path(tempfile.mkdtemp(prefix="compose_speed_"))
    sub = ds.subset("train", images=sorted(ds.images.image_path)[:40])
    make_chips(sub, work / "pool", ChipConfig(size=96), progress=False)
    items = load_pool([work / "pool"], ds.names)
    base = ComposeConfig.from_yaml(REPO / "configs" / "compose" / "glacierbay-seals.yaml")
    t0 = time.perf_counter()
    recs = list(_run(_mask_job, [(Path(it["file"]), work / "masks", base.mask) for it in items], args.workers,
                     None, "masks"))
    t_masks = time.perf_counter() - t0
    good = [{**it, "mask": r["mask"], "mask_method": r["method"]} for it, r in zip(items, recs, strict=True)
            if r["mask"]]
    load0 = os.getloadavg()[0]
    rows = []
    for name, mix in MODES.items():
        cfg = base.model_copy(update={
            "count": base.count.model_copy(update={"distribution": "uniform", "low": 5, "high": 5}),
            "habitat": base.habitat.model_copy(update={"kind": "none"}),
            "blend": base.blend.model_copy(update={"mix": mix})})
        state = {"cfg": cfg, "items": good, "out": work / name.split()[0],
                 "sizes": DatasetSizes(ds.boxes, cfg.scale.jitter)}
        jobs = _jobs(ds, cfg, None, args.tiles + 2 * args.workers)
        with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(state,)) as ex:
            list(ex.map(_timed, jobs[:2 * args.workers]))  # warm-up: imports, albumentations, chip cache
            t0 = time.perf_counter()
            res = list(ex.map(_timed, jobs[2 * args.workers:]))
            dt = time.perf_counter() - t0
        pasted = sum(r["row"]["n_pasted"] for r, _ in res)
        cpu = float(np.mean([c for _, c in res]))
        rows.append({"mode": name, "tiles": len(res), "seconds": round(dt, 2), "tiles_per_s": round(len(res) / dt, 1),
                     "cpu_ms_per_tile": round(cpu * 1000, 1),
                     "cpu_bound_tiles_per_s": round(args.workers / cpu, 1),
                     "instances_per_tile": round(pasted / len(res), 2)})
        print(rows[-1])
    result = {"workers": args.workers, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "tile_px": 640, "pool_masks": len(good), "pool_chips": len(items),
              "mask_seconds": round(t_masks, 2), "load_avg_1min_start": round(load0, 2),
              "load_avg_1min_end": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compose_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# compose speed (640 px seal tiles, 5 instances each)", "",
          f"{args.workers} worker processes on {os.cpu_count()} CPU cores; 1-min load average "
          f"{result['load_avg_1min_start']} at start, {result['load_avg_1min_end']} at end (other jobs share "
          f"the machine). Masks for {len(items)} chips: {t_masks:.1f} s ({len(good)} accepted).", "",
          "wall tiles/s is what this run got on the shared machine; cpu-bound tiles/s = workers / CPU s per tile "
          "(what the same workers reach on otherwise idle cores).", "",
          "| blend mode | tiles | wall s | wall tiles/s | CPU ms/tile | cpu-bound tiles/s | instances/tile |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['tiles']} | {r['seconds']} | {r['tiles_per_s']} | {r['cpu_ms_per_tile']} | "
           f"{r['cpu_bound_tiles_per_s']} | {r['instances_per_tile']} |" for r in rows]
    (args.out / "compose_speed.md").write_text("\n".join(md) + "\n")
    print(f"-> {args.out / 'compose_speed.md'}")


if __name__ == "__main__":
    main()

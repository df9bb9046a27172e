"""The real-only learning curve that sets a scale's detector schedule: mAP50 vs epochs.

Why: arms compared at a schedule where real-only is still climbing measure optimizer steps, not
data. One real-only detector per seed trains `curve.epochs` epochs keeping every epoch's weights;
each kept checkpoint is scored on the validation part (never the test split) with the benchmark's
own inference. The chosen schedule is the first epoch whose mAP50 (mean over seeds, running mean of 3
checkpoints) is within `tolerance` of the curve's plateau (its best running mean). A checkpoint at
epoch e of a longer run has not decayed its learning rate as an e-epoch run would, so the curve is
a conservative (late) estimate of where real-only levels off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from detection.metrics import evaluate
from synthgen.benchmark.cache import stage_hash
from synthgen.benchmark.pipeline import Benchmark, make_benchmark
from synthgen.io_utils import atomic_write, write_json


def learning_curve(bench: Benchmark) -> dict:
    """Train and score the scale's curve; writes curve.json, curve.md and curve.png under `bench.out`."""
    s = bench.scale
    c = s.curve
    fraction, seeds, every, tolerance = c.fraction, c.seeds, c.every, c.tolerance
    base_key = bench.prepare()
    table = pd.read_csv(bench.work / "split" / "split.csv")
    val_images = list(table.image_path[table.bench_split == "val"])
    gt = pd.read_csv(bench.work / "split" / "boxes.csv")
    rows = []
    for seed in seeds:
        sub_key, train = bench.subset(base_key, fraction, seed)
        folder = f"curve/f{fraction:g}-s{seed}"
        best = bench.detector("real", sub_key, folder, train, None, None, seed, epochs=c.epochs,
                              overrides={"save_period": 1})
        weights = best.parent
        for e in range(every, c.epochs + 1, every):
            ckpt = weights / f"epoch{e - 1}.pt"  # ultralytics numbers epochs from 0
            if e == c.epochs or not ckpt.is_file():
                ckpt = weights / "last.pt"
            key = stage_hash("curve-eval", bench._keys[folder], e, s.eval_conf, s.native)

            def build(d: Path, ckpt: Path = ckpt) -> dict:
                pred = bench.predictions(ckpt, val_images)
                return {"map50": evaluate(gt, pred, images=val_images, names=bench.split_info["names"]).map50}

            m = bench.cache.run(f"{folder}/eval-e{e}", key, build)
            rows.append({"seed": seed, "epoch": e, "map50": m["map50"]})
    mean, smooth, plateau, chosen = choose_epochs(pd.DataFrame(rows), tolerance)
    res = {"name": bench.cfg.name, "scale": bench.scale_name, "fraction": fraction, "seeds": seeds,
           "imgsz": s.detector.imgsz, "native": s.native.model_dump() if s.native else None,
           "model": s.detector.model, "batch": s.detector.batch, "train_list_images": len(train.read_text().split()),
           "val_images": len(val_images), "tolerance": tolerance, "plateau_map50": plateau, "chosen_epochs": chosen,
           "points": rows, "stage_seconds": dict(bench.cache.seconds)}
    _write(res, mean, smooth, bench.out)
    return res


def choose_epochs(points: pd.DataFrame, tolerance: float) -> tuple[pd.Series, pd.Series, float, int]:
    """(mean mAP50 per epoch, its running mean of 3, plateau = best running mean, first epoch within
    `tolerance` of the plateau) from rows of seed, epoch, map50."""
    mean = points.groupby("epoch").map50.mean()
    smooth = mean.rolling(3, min_periods=1, center=True).mean()
    plateau = float(smooth.max())
    return mean, smooth, plateau, int(smooth.index[np.argmax(smooth.to_numpy() >= plateau - tolerance)])


def run_learning_curve(cfg, scale: str = "cpu", out: str | Path | None = None, work: str | Path | None = None,
                       device: str = "auto", progress: bool = True) -> dict:
    """`synthgen benchmark --learning-curve`: shares the benchmark's stage cache (split, windows, subsets);
    the report goes to WORK/curve unless `out` names a folder."""
    bench = make_benchmark(cfg, scale, out, work, device, progress, default_out="curve")
    if progress:
        from rich.console import Console

        bench.cache.log = Console(stderr=True).print
    return learning_curve(bench) | {"out": str(bench.out / "curve.md")}


def _write(res: dict, mean: pd.Series, smooth: pd.Series, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "curve.json", res)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mean.index, mean.to_numpy(), marker="o", label="mean over seeds")
    ax.plot(smooth.index, smooth.to_numpy(), label="running mean of 3")
    ax.axhline(res["plateau_map50"] - res["tolerance"], ls="--", c="grey", label="plateau - tolerance")
    ax.axvline(res["chosen_epochs"], ls=":", c="k", label=f"chosen: {res['chosen_epochs']} epochs")
    ax.set_xlabel("epoch")
    ax.set_ylabel("real-only mAP50 on the validation part")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    with atomic_write(out / "curve.png", "wb") as f:
        fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    train_s = sum(v for k, v in res["stage_seconds"].items() if "/eval" not in k)
    lines = [f"# Real-only learning curve `{res['name']}` (scale `{res['scale']}`)", "",
             f"Detector `{res['model']}`, imgsz {res['imgsz']}, batch {res['batch']}, "
             + (f"{res['native']['window']} px windows at full resolution, sliced inference; "
                if res["native"] else "whole tiles resized; ")
             + f"{res['fraction']:.0%} real ({res['train_list_images']} training images), seeds {res['seeds']}; "
             f"mAP50 on the {res['val_images']} validation images (not the test split).", "",
             f"Plateau (best running mean) {res['plateau_map50']:.3f}; the first epoch within "
             f"{res['tolerance'] * 100:.0f} point of it: **{res['chosen_epochs']}**. Stage wall time "
             f"{train_s:.0f} s training+data, {sum(res['stage_seconds'].values()) - train_s:.0f} s scoring.", "",
             "| epoch | mAP50 (mean) | running mean |", "|---|---|---|",
             *[f"| {e} | {m:.3f} | {s:.3f} |" for e, m, s in zip(mean.index, mean, smooth, strict=True)], "",
             "![curve](curve.png)"]
    with atomic_write(out / "curve.md") as f:
        f.write("\n".join(lines) + "\n")

"""Adding a taxon without retraining, at small CPU scale: does the old taxa's output degrade, does
the new taxon learn, how big is the stored delta?

    python benchmarks/continual_add_taxon.py --base-steps 400 --add-steps 300 --threads 2

A tiny pixel model is trained on aquarium chips of six taxa (starfish held out), then starfish
(phylum Echinodermata, class Asteroidea: new rows at two levels) is added with each tuning mode.
Judge: nearest-centroid on real *valid*-split chips (synthgen.continual.CentroidJudge). Same
seeds before/after, so old-taxa samples are compared image by image. Writes
benchmarks/results/continual_add_taxon.json and .md."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AQUARIUM = REPO.parent / "shared" / "data" / "aquarium"
TAXA = REPO / "configs" / "taxonomy" / "aquarium.csv"
NEW = "starfish"



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--add-steps", type=int, default=300)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--modes", default="rows,rows+bias+norm,full")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from detection.chips import ChipConfig, make_chips, subset_chips
    from synthgen.continual import (
        CentroidJudge,
        ContinualConfig,
        add_taxa,
        load_model_folder,
        old_taxa_report,
        sample_taxa,
    )
    from synthgen.train import TrainConfig, load_chips, train

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="continual-bench-"))
    cc = ChipConfig(size=32, max_per_class=args.per_class)
    make_chips(AQUARIUM, work / "train-all", cc, taxonomy=TAXA, split="train")
    make_chips(AQUARIUM, work / "valid", cc, taxonomy=TAXA, split="val")
    old = subset_chips(work / "train-all", work / "train-old", lambda lb: lb != NEW)
    t0 = time.time()
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=args.base_steps, batch_size=args.batch,
                      warmup_steps=20, checkpoint_every=200, log_every=10, device="cpu", threads=args.threads,
                      ema_decay=0.995)
    train(cfg, work / "base", chips=old)
    base_s = time.time() - t0
    sched = json.loads((work / "base/scheduler/scheduler_config.json").read_text())
    valid = load_chips(work / "valid", 32, None)
    judge = CentroidJudge(valid.images, valid.taxa)
    results = {"batch": args.batch, "sample_steps": args.sample_steps, "base_steps": args.base_steps, "add_steps": args.add_steps, "per_class": args.per_class,
               "samples_per_taxon": args.samples, "base_train_s": round(base_s, 1), "modes": {}}
    for mode in args.modes.split(","):
        out = work / f"ext-{mode}"
        t0 = time.time()
        res = add_taxa(work / "base", work / "train-all", out, TAXA,
                       ContinualConfig(tune=mode, steps=args.add_steps, batch_size=args.batch, device="cpu",
                                       threads=args.threads, lr=1e-3 if mode != "full" else 2e-4))
        add_s = time.time() - t0
        rep = old_taxa_report(work / "base", out, work / "valid", n=args.samples, steps=args.sample_steps)
        ext = load_model_folder(out)
        new_lin = json.loads((out / "taxon_counts.json").read_text())["Asteroidea"]["lineage"]
        new_imgs = sample_taxa(ext, sched, {"Asteroidea": new_lin}, args.samples, args.sample_steps, seed=7)["Asteroidea"]
        new_acc = float(np.mean([p == "Asteroidea" for p in judge.predict(new_imgs)]))
        results["modes"][mode] = {
            "old_acc_before": rep["acc_before"], "old_acc_after": rep["acc_after"],
            "old_mean_abs_pixel_diff": rep["mean_abs_pixel_diff"],
            "old_identical": all(v["identical"] for v in rep["per_taxon"].values()),
            "new_taxon_acc": new_acc, "delta_bytes": res.delta_bytes, "base_bytes": res.base_bytes,
            "add_s": round(add_s, 1), "final_loss": res.final_loss,
        }
        print(mode, results["modes"][mode], flush=True)
    res_dir = REPO / "benchmarks" / "results"
    (res_dir / "continual_add_taxon.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Adding a taxon (starfish) to a tiny aquarium model without retraining",
        "",
        f"Base: tiny preset, 32 px, {args.base_steps} steps on 6 taxa ({args.per_class} chips max each); "
        f"add: {args.add_steps} steps. Judge: nearest centroid on real valid chips (7 taxa, chance ~0.14), "
        f"{args.samples} samples per taxon, DDIM {args.sample_steps} steps, batch {args.batch}, same seeds before/after. CPU, {args.threads} threads, shared machine.",
        "",
        "| tune | old-taxa judge acc before | after | old mean abs pixel diff (0-255) | old bit-identical | new-taxon judge acc | delta size | full weights | add time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['old_acc_before']:.3f} | {r['old_acc_after']:.3f} | {r['old_mean_abs_pixel_diff']:.2f} | "
                     f"{r['old_identical']} | {r['new_taxon_acc']:.3f} | {r['delta_bytes'] / 1e3:.1f} KB | "
                     f"{r['base_bytes'] / 1e6:.2f} MB | {r['add_s']} |")
    (res_dir / "continual_add_taxon.md").write_text("\n".join(lines) + "\n")
    print(f"-> {res_dir / 'continual_add_taxon.md'}")


if __name__ == "__main__":
    main()

"""Adding a taxon without retraining, at small CPU scale: does the old taxa's output degrade, does
the new taxon learn, how big is the stored delta?

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/continual_add_taxon.py --base-steps 150 --add-steps 100 \\
        --per-class 40 --samples 8 --sample-steps 10 --batch 16 --threads 1

A tiny pixel model is trained on aquarium chips of six taxa (starfish held out), then starfish
(phylum Echinodermata, class Asteroidea: new rows at two levels) is added with each tuning mode.
Judge: synthgen's taxonomic classifier (configs/judge/resnet18-cpu.yaml at the benchmark's chip
size) trained on the real aquarium train chips; its accuracy on the real valid chips is the
reference a sample's judge accuracy is read against. A sample counts as right when the judge gets
every level of its intended lineage. Same seeds before/after, so old-taxa samples are compared
image by image. Writes continual_add_taxon.json and .md into --results."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AQUARIUM = REPO.parent / "shared" / "data" / "aquarium"
TAXA = REPO / "configs" / "taxonomy" / "aquarium.csv"
JUDGE = REPO / "configs" / "judge" / "resnet18-cpu.yaml"
NEW = "starfish"
NEW_TAXON = "Asteroidea"


def judged(scorer, images, taxon: str) -> float:
    """Share of uint8 [n,3,S,S] samples whose whole intended lineage the judge predicts."""
    from PIL import Image

    pils = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]
    return float(scorer.taxon_correct(scorer.classify(pils), [taxon] * len(pils)).mean())


def above_chance(acc: float, n: int, chance: float) -> bool:
    """acc beyond chance + 2 binomial standard errors at n samples."""
    return acc > chance + 2 * math.sqrt(chance * (1 - chance) / n)


def reading(r: dict, chance: float) -> list[str]:
    """What the figures show and what they do not, derived from the numbers."""
    ref, n_old = r["judge"]["real_valid"], r["samples_per_taxon"] * r["old_taxa"]
    out = [f"Judge reference (real valid chips, whole lineage right): old taxa {ref['old_taxa_acc']:.2f} "
           f"(mean per taxon), starfish {ref['new_taxon_acc']:.2f}; chance {chance:.2f}."]
    before = r["old_acc_before"]
    if not above_chance(before, n_old, chance):
        out.append(f"The base model's old-taxa samples are judged right {before:.2f} of the time, not above chance "
                   f"at {n_old} samples: the base does not yet draw taxa the judge recognises, so the before/after "
                   "columns cannot show degradation, whatever they read.")
    else:
        out.append(f"The base model's old-taxa samples are judged right {before:.2f} of the time (above chance at "
                   f"{n_old} samples; real chips: {ref['old_taxa_acc']:.2f}).")
        se = 2 * math.sqrt(max(before * (1 - before), 1 / n_old) / n_old)
        for mode, m in r["modes"].items():
            d = m["old_acc_after"] - before
            verdict = "within noise" if abs(d) <= se else ("a drop beyond noise" if d < 0 else "a rise beyond noise")
            out.append(f"- {mode}: after - before = {d:+.3f} (2 binomial s.e. of before: {se:.3f}): {verdict}.")
    if not above_chance(ref["new_taxon_acc"], ref["new_taxon_n"], chance):
        out.append(f"The judge itself gets real starfish right only {ref['new_taxon_acc']:.2f} of the time "
                   f"({ref['new_taxon_n']} chips): the new-taxon column cannot show learning.")
    learned = [mode for mode, m in r["modes"].items() if above_chance(m["new_taxon_acc"], r["samples_per_taxon"], chance)]
    out.append(f"New taxon judged right above chance with: {', '.join(learned)}." if learned else
               f"No tuning mode's starfish samples are judged starfish above chance at {r['samples_per_taxon']} "
               "samples: the figures do not show the new taxon learned.")
    out.append("Pixel differences and bit-identity are exact (same seeds); the judge columns rest on few samples "
               "per taxon and a judge trained for CPU minutes.")
    return out


def write_report(results: dict, out: Path) -> None:
    """continual_add_taxon.md from the results dict (also re-renders a saved JSON: --render)."""
    from synthgen.io_utils import atomic_write

    r, j = results, results["judge"]
    jc, chance = j["config"], 1 / (r["old_taxa"] + 1)
    lines = [
        "# Adding a taxon (starfish) to a tiny aquarium model without retraining",
        "",
        f"Base: tiny preset, {jc['img_size']} px, {r['base_steps']} steps on {r['old_taxa']} taxa ({r['per_class']} "
        f"chips max each); add: {r['add_steps']} steps, {r['new_share']:.0%} of each replay batch new-taxon chips. "
        f"Judge: {jc['arch']} x{jc['width']} at {jc['img_size']} px, {jc['epochs']} epochs on {j['train_chips']} real "
        f"train chips ({j['train_s']:.0f} s); real valid accuracy {j['real_valid']['taxon_acc']:.2f} over "
        f"{j['val_chips']} chips. {r['samples_per_taxon']} samples per taxon, DDIM {r['sample_steps']} steps, batch "
        f"{r['batch']}, same seeds before/after. CPU, {r['threads']} threads, shared machine.",
        "",
        "| tune | old-taxa judge acc before | after | old mean abs pixel diff (0-255) | old bit-identical | "
        "new-taxon judge acc | delta size | full weights | add time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["modes"].items():
        lines.append(f"| {mode} | {r['old_acc_before']:.3f} | {m['old_acc_after']:.3f} | "
                     f"{m['old_mean_abs_pixel_diff']:.2f} | {m['old_identical']} | {m['new_taxon_acc']:.3f} | "
                     f"{m['delta_bytes'] / 1e3:.1f} KB | {m['base_bytes'] / 1e6:.2f} MB | {m['add_s']} |")
    lines += ["", "Reading (generated from the figures):", "", *reading(r, chance)]
    with atomic_write(out / "continual_add_taxon.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


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
    ap.add_argument("--judge-epochs", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--render", type=Path, default=None, help="only re-render the markdown of a saved JSON")
    args = ap.parse_args()
    if args.render:
        write_report(json.loads(args.render.read_text()), args.results)
        return

    import torch

    from detection.chips import ChipConfig, make_chips, subset_chips
    from synthgen.continual import ContinualConfig, add_taxa, sample_taxa
    from synthgen.io_utils import write_json
    from synthgen.models.delta import load_model_folder
    from synthgen.scoring import JudgeConfig, JudgeScorer, train_judge
    from synthgen.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="continual-bench-"))
    size = 32
    make_chips(AQUARIUM, work / "train-all", ChipConfig(size=size, max_per_class=args.per_class), taxonomy=TAXA,
               split="train")
    make_chips(AQUARIUM, work / "judge-chips", ChipConfig(size=size), taxonomy=TAXA, split=None)  # train + val, all
    jcfg = JudgeConfig.from_yaml(JUDGE, img_size=size, epochs=args.judge_epochs, device="cpu")
    jm = train_judge(work / "judge-chips", work / "judge", jcfg)
    scorer = JudgeScorer(work / "judge", device="cpu")
    old = subset_chips(work / "train-all", work / "train-old", lambda lb: lb != NEW)
    t0 = time.time()
    cfg = TrainConfig(preset="tiny", image_size=size, mode="flat", steps_per_stage=args.base_steps,
                      batch_size=args.batch, warmup_steps=20, checkpoint_every=200, log_every=10, device="cpu",
                      threads=args.threads, ema_decay=0.995)
    train(cfg, work / "base", chips=old)
    base_s = time.time() - t0
    sched = json.loads((work / "base/scheduler/scheduler_config.json").read_text())
    trained = json.loads((work / "base/taxon_counts.json").read_text())
    lineages = {t: c["lineage"] for t, c in trained.items()}
    before = sample_taxa(load_model_folder(work / "base"), sched, lineages, args.samples, args.sample_steps, seed=0)
    acc_before = {t: judged(scorer, before[t], t) for t in lineages}
    per_real = jm["val"]["per_taxon"]
    results = {
        "batch": args.batch, "sample_steps": args.sample_steps, "base_steps": args.base_steps,
        "add_steps": args.add_steps, "per_class": args.per_class, "samples_per_taxon": args.samples,
        "old_taxa": len(lineages), "base_train_s": round(base_s, 1), "threads": args.threads,
        "new_share": ContinualConfig().new_share,
        "judge": {"config": jcfg.model_dump(), "train_chips": jm["train_chips"], "val_chips": jm["val_chips"],
                  "train_s": jm["train_seconds"],
                  "real_valid": {"taxon_acc": jm["val"]["taxon_accuracy"],
                                 "old_taxa_acc": float(np.mean([per_real[t]["accuracy"] for t in lineages])),
                                 "new_taxon_acc": per_real[NEW_TAXON]["accuracy"],
                                 "new_taxon_n": per_real[NEW_TAXON]["n"],
                                 "per_taxon": {t: v["accuracy"] for t, v in per_real.items()}}},
        "old_acc_before": float(np.mean(list(acc_before.values()))), "old_acc_before_per_taxon": acc_before,
        "modes": {},
    }
    for mode in args.modes.split(","):
        out = work / f"ext-{mode}"
        t0 = time.time()
        res = add_taxa(work / "base", work / "train-all", out, TAXA,
                       ContinualConfig(tune=mode, steps=args.add_steps, batch_size=args.batch, device="cpu",
                                       threads=args.threads, lr=1e-3 if mode != "full" else 2e-4))
        add_s = time.time() - t0
        ext = load_model_folder(out)
        after = sample_taxa(ext, sched, lineages, args.samples, args.sample_steps, seed=0)
        acc_after = {t: judged(scorer, after[t], t) for t in lineages}
        new_lin = json.loads((out / "taxon_counts.json").read_text())[NEW_TAXON]["lineage"]
        new_imgs = sample_taxa(ext, sched, {NEW_TAXON: new_lin}, args.samples, args.sample_steps, seed=7)[NEW_TAXON]
        results["modes"][mode] = {
            "old_acc_after": float(np.mean(list(acc_after.values()))), "old_acc_after_per_taxon": acc_after,
            "old_mean_abs_pixel_diff": float(np.mean([(before[t].float() - after[t].float()).abs().mean().item()
                                                      for t in lineages])),
            "old_identical": all(torch.equal(before[t], after[t]) for t in lineages),
            "new_taxon_acc": judged(scorer, new_imgs, NEW_TAXON), "delta_bytes": res.delta_bytes,
            "base_bytes": res.base_bytes, "add_s": round(add_s, 1), "final_loss": res.final_loss,
        }
        print(mode, results["modes"][mode], flush=True)
    write_json(args.results / "continual_add_taxon.json", results)
    write_report(results, args.results)
    print(f"-> {args.results / 'continual_add_taxon.md'}")


if __name__ == "__main__":
    main()

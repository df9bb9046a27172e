"""Judge from ImageNet EfficientNet-Lite0 (the pip wheel) vs from scratch, at the same CPU-minute budget.

Per arm, one timing epoch measures the CPU seconds (process time, not wall: the machine is shared) an
epoch costs; the measured run then gets as many epochs as fit in the budget (at least 1). Reports per-rank accuracy on the aquarium valid chips and, on
the seals (animal chips + background chips, valid split held out), the animal head's accuracy and the
mean p_animal of held-out seal and background chips.

    python benchmarks/judge_pretrained.py --aquarium runs/eyes/aq_chips --seals runs/eyes/seal_chips \
        --seal-background runs/eyes/seal_bg --budget-min 5 --work runs/eyes/judge \
        --out benchmarks/results/judge_pretrained
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from synthgen.io_utils import atomic_write, write_json
from synthgen.scoring import JudgeConfig, JudgeScorer, Pool, train_judge

REPO = Path(__file__).resolve().parents[1]
ARMS = {"pretrained": REPO / "configs/judge/efficientnet-lite0-cpu.yaml",
        "scratch": REPO / "configs/judge/resnet18-cpu.yaml"}


def timed_train(chips: Path, out: Path, cfg: JudgeConfig, background: Path | None) -> tuple[dict, float]:
    """Train and return (metrics, CPU seconds of this process)."""
    t = time.process_time()
    m = train_judge(chips, out, cfg, background=background)
    return m, time.process_time() - t


def arm(name: str, chips: Path, work: Path, budget_s: float, background: Path | None) -> dict:
    cfg = JudgeConfig.from_yaml(ARMS[name])
    probe, _ = timed_train(chips, work / f"{name}-probe", cfg.model_copy(update={"epochs": 1}), background)
    per_epoch = probe["history"][0]["cpu_seconds"]
    epochs = max(1, int(budget_s // per_epoch))
    m, cpu = timed_train(chips, work / name, cfg.model_copy(update={"epochs": epochs}), background)
    return {"config": str(ARMS[name].relative_to(REPO)), "arch": cfg.arch, "pretrained": cfg.pretrained,
            "img_size": cfg.img_size, "epoch_seconds": per_epoch, "epochs": epochs,
            "train_cpu_seconds": round(sum(h["cpu_seconds"] for h in m["history"]), 1),
            "process_cpu_seconds": round(cpu, 1), "metrics": m, "folder": str(work / name)}


def p_animal(judge: Path, chips: Path, background: Path) -> dict:
    """Mean ± sd of p_animal over held-out (valid) seal chips and background chips."""
    sc = JudgeScorer(judge, device="cpu")
    out = {}
    for what, folder in (("seal", chips), ("background", background)):
        pool = Pool.load(folder)
        rows = [r for r in pool.rows if r.get("split") in ("val", "valid")]
        emb = sc.embed_images(list(pool.images(rows)))
        p = sc.extra_scores(emb, [sc.space.taxa[0]] * len(rows))["p_animal"]
        out[what] = {"mean": float(p.mean()), "sd": float(p.std(ddof=1)), "n": len(rows),
                     "share_at_least_0.5": float((p >= 0.5).mean())}
    return out


def markdown(res: dict) -> str:
    aq = res["aquarium"]
    levels = list(aq["pretrained"]["metrics"]["val"]["per_level"])
    lines = [f"# Judge: ImageNet EfficientNet-Lite0 (pip wheel) vs from scratch, {res['budget_min']} CPU minutes each",
             "", f"Command: `{res['command']}`", "",
             "| arm | backbone | img | epochs | CPU s/epoch | training CPU s |", "|---|---|---|---|---|---|"]
    for a in ("pretrained", "scratch"):
        d = aq[a]
        lines.append(f"| {a} | {d['arch']} ({d['pretrained'] or 'scratch'}) | {d['img_size']} | {d['epochs']} | "
                     f"{d['epoch_seconds']:.0f} | {d['train_cpu_seconds']:.0f} |")
    lines += ["", f"## Aquarium valid chips (n = {aq['pretrained']['metrics']['val']['n']}): accuracy per rank", "",
              "| rank | n | pretrained | scratch |", "|---|---|---|---|"]
    for lv in levels:
        p, s = (aq[a]["metrics"]["val"]["per_level"][lv] for a in ("pretrained", "scratch"))
        if p["accuracy"] is not None:
            lines.append(f"| {lv} | {p['n']} | {p['accuracy']:.3f} | {s['accuracy']:.3f} |")
    for k, label in (("taxon_accuracy", "whole lineage right"), ("balanced_taxon_accuracy", "balanced over taxa")):
        lines.append(f"| {label} | {aq['pretrained']['metrics']['val']['n']} | "
                     f"{aq['pretrained']['metrics']['val'][k]:.3f} | {aq['scratch']['metrics']['val'][k]:.3f} |")
    lines += ["", "| taxon (rank) | n | pretrained | scratch |", "|---|---|---|---|"]
    for t, d in aq["pretrained"]["metrics"]["val"]["per_taxon"].items():
        lines.append(f"| {t} ({d['level']}) | {d['n']} | {d['accuracy']:.3f} | "
                     f"{aq['scratch']['metrics']['val']['per_taxon'][t]['accuracy']:.3f} |")
    if "seals" in res:
        se = res["seals"]
        lines += ["", f"## Seals: animal-vs-background head, {res['seal_budget_min']} CPU minutes each (valid seal "
                  "chips and valid background chips)", "",
                  "| arm | epochs | accuracy | p_animal seals (mean ± sd) | p_animal background (mean ± sd) |",
                  "|---|---|---|---|---|"]
        for a in ("pretrained", "scratch"):
            d, pa = se[a], se[a]["p_animal"]
            lines.append(f"| {a} | {d['epochs']} | {d['metrics']['animal']['accuracy']:.3f} | "
                         f"{pa['seal']['mean']:.3f} ± {pa['seal']['sd']:.3f} (n={pa['seal']['n']}) | "
                         f"{pa['background']['mean']:.3f} ± {pa['background']['sd']:.3f} "
                         f"(n={pa['background']['n']}) |")
    lines += ["", "Accuracies are single runs (seed 0) on fixed held-out chips; a 95% binomial interval at "
              "n = 900 is about ±0.03."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aquarium", type=Path, required=True)
    ap.add_argument("--seals", type=Path)
    ap.add_argument("--seal-background", type=Path)
    ap.add_argument("--budget-min", type=float, default=5.0)
    ap.add_argument("--seal-budget-min", type=float, default=3.0)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {"budget_min": a.budget_min, "command": "python benchmarks/judge_pretrained.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
        "seal_budget_min": a.seal_budget_min, "aquarium": {}}
    a.out.mkdir(parents=True, exist_ok=True)
    for n in ARMS:  # finished arms are reused: train_judge returns a finished folder's metrics
        res["aquarium"][n] = arm(n, a.aquarium, a.work / "aquarium", a.budget_min * 60, None)
        write_json(a.out / "results.json", res)  # partial results survive a kill
    if a.seals and a.seal_background:
        res["seals"] = {}
        for n in ARMS:
            d = arm(n, a.seals, a.work / f"seals-{a.seal_budget_min:g}min", a.seal_budget_min * 60, a.seal_background)
            d["p_animal"] = p_animal(Path(d["folder"]), a.seals, a.seal_background)
            res["seals"][n] = d
            write_json(a.out / "results.json", res)
    with atomic_write(a.out / "results.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""The real-vs-real floor of the realism measure (`synthgen.metrics.realism`) in each feature space:
what two-sample accuracy, FD, KID and precision/recall read when both sides are real chips, i.e. the
best a perfect generator can score at these sample sizes.

Per dataset: `realism(valid chips, n train chips)` (train vs held-out photos: the floor evaluate-samples
prints) and its built-in floor (two random halves of the valid chips), in ImageNet EfficientNet-Lite0
features (default) and in each judge's penultimate features.

    python benchmarks/realism_floor.py --chips aquarium=runs/eyes/aq_chips --chips seals=runs/eyes/seal_chips \
        --judge pretrained=runs/eyes/judge/aquarium/pretrained --judge scratch=runs/eyes/judge/aquarium/scratch \
        --out benchmarks/results/realism_floor
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from synthgen.features import ImageNetFeatures
from synthgen.io_utils import atomic_write, write_json
from synthgen.metrics import realism
from synthgen.scoring import JudgeScorer, Pool


def pairs(items: list[str]) -> dict[str, Path]:
    return {k: Path(v) for k, _, v in (i.partition("=") for i in items)}


def markdown(res: dict) -> str:
    lines = ["# Real-vs-real floor of the realism measure", "", f"Command: `{res['command']}`", "",
             "train vs valid: n valid chips against as many train chips (different photos); valid halves: two "
             "random halves of the valid chips. Two-sample accuracy is a 5-fold logistic regression, 95% Wilson "
             "interval; 0.5 = indistinguishable. KID mean ± sd over subsets.", "",
             "| dataset | features | comparison | n per side | two-sample acc. [95% CI] | FD | KID | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ds, spaces in res["datasets"].items():
        for space, r in spaces.items():
            for what, d in (("train vs valid", r["generated"]), ("valid halves", r["floor"])):
                ts = d["two_sample"]
                lines.append(f"| {ds} | {space} | {what} | {d['n_other']} | {ts['accuracy']:.3f} "
                             f"[{ts['interval'][0]:.3f}, {ts['interval'][1]:.3f}] | {d['fd']:.2f} | "
                             f"{d['kid']['mean']:.4f} ± {d['kid']['sd']:.4f} | {d['precision']:.3f} | {d['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", action="append", required=True, help="NAME=chips folder (train and val splits)")
    ap.add_argument("--judge", action="append", default=[], help="NAME=judge folder (its features, aquarium only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {"command": "python benchmarks/realism_floor.py " + " ".join(
        [f"--chips {c}" for c in a.chips] + [f"--judge {j}" for j in a.judge] + [f"--out {a.out}"]), "datasets": {}}
    imagenet = ImageNetFeatures(device="cpu")
    judges = {k: JudgeScorer(v, device="cpu") for k, v in pairs(a.judge).items()}
    for ds, folder in pairs(a.chips).items():
        pool = Pool.load(folder)
        val = [pool.path(r) for r in pool.rows if r.get("split") in ("val", "valid")]
        train = [pool.path(r) for r in pool.rows if r.get("split") == "train"]
        train = [train[i] for i in np.random.default_rng(a.seed).choice(len(train), len(val), replace=False)]
        spaces = {"imagenet (EfficientNet-Lite0, 128 px)": imagenet}
        known = {r["taxon"] for r in pool.rows}
        spaces |= {f"judge {k}": j for k, j in judges.items() if known <= set(j.space.lineages)}
        res["datasets"][ds] = {name: realism(val, train, features=fx, seed=a.seed) for name, fx in spaces.items()}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "results.json", res)
    with atomic_write(a.out / "results.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

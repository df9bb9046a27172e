"""Branch points (hierarchically branched diffusion): the diffusion time at which two taxa merge.

For taxa A and B, chips are forward-noised with the model's own schedule over a grid of t. At each
t the mean distance between a noised A and a noised B is compared with the mean distance between
two noised instances of the same taxon. While taxa are distinguishable the between-taxon distance
is larger; the branch point is the first t where it is no more than `tol` above the within-taxon
distance: above it, the reverse process of A and B is one branch. Distances use low-resolution
colour layout (what survives noise longest), each instance with its own noise draw.

Stored as `branch_points.json` in the model folder; used by transmutation (how far to noise) and,
optionally, as per-target guidance windows (guide towards a level only after it has branched;
`synthgen generate --window-from-branch-points`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from synthgen.errors import SynthgenError
from synthgen.io_utils import write_json
from synthgen.train.data import load_chips

BRANCH_FILE = "branch_points.json"


def _features(x0: torch.Tensor, alphas: torch.Tensor, t: int, g: torch.Generator, size: int) -> torch.Tensor:
    """Forward-noised chips (float in [-1, 1]) at timestep t, pooled to size x size, flattened."""
    a = alphas[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    return F.adaptive_avg_pool2d(xt, size).flatten(1)


def _mean_dist(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
    d = torch.cdist(a, b)
    if same:  # distinct pairs only
        n = len(a)
        return float(d.sum() / max(1, n * (n - 1)))
    return float(d.mean())


def divergence_level(lin_a: dict[str, str], lin_b: dict[str, str], levels: list[str]) -> str:
    """The first level (coarse to fine) where two lineages differ: the rank at which they branch."""
    for lv in levels:
        if lin_a.get(lv) != lin_b.get(lv):
            return lv
    return levels[-1]


def compute_branch_points(chips: str | Path, sched_config: dict, size: int, n_per_taxon: int = 32,
                          grid: int = 50, feature_size: int = 8, tol: float = 0.02, split: str | None = "train",
                          seed: int = 0, progress: bool = True) -> dict:
    """Branch point of every pair of taxa in the chips folder, and per divergence level the median."""
    data = load_chips(chips, size, split)
    by_taxon: dict[str, list[int]] = {}
    for i, t in enumerate(data.taxa):
        by_taxon.setdefault(t, []).append(i)
    taxa = sorted(t for t, idx in by_taxon.items() if len(idx) >= 2)
    if len(taxa) < 2:
        raise SynthgenError(f"{chips}: branch points need at least two taxa with two or more chips each")
    lineage = {t: data.lineages[by_taxon[t][0]] for t in taxa}
    levels = _level_order(list(lineage.values()))
    sched = DDPMScheduler.from_config(sched_config)
    T = int(sched.config.num_train_timesteps)
    alphas = sched.alphas_cumprod.double()
    ts = np.unique(np.linspace(0, T - 1, grid).round().astype(int)).tolist()
    rng = np.random.default_rng(seed)
    x0 = {}
    for t in taxa:
        idx = by_taxon[t]
        pick = rng.choice(idx, size=min(n_per_taxon, len(idx)), replace=False)
        x0[t] = data.images[pick].double().div(127.5).sub(1.0)
    curves: dict[str, list[float]] = {t: [] for t in taxa}  # within-taxon distance per t
    between: dict[tuple[str, str], list[float]] = {p: [] for p in itertools.combinations(taxa, 2)}
    for k, t in enumerate(tqdm(ts, desc="branch points", unit="t", disable=not progress)):
        g = torch.Generator().manual_seed(seed * 100003 + k)
        feats = {tx: _features(x0[tx], alphas, t, g, feature_size) for tx in taxa}
        for tx in taxa:
            curves[tx].append(_mean_dist(feats[tx], feats[tx], same=True))
        for a, b in between:
            between[(a, b)].append(_mean_dist(feats[a], feats[b], same=False))
    pairs = {}
    for (a, b), bt in between.items():
        within = [(wa + wb) / 2 for wa, wb in zip(curves[a], curves[b], strict=True)]
        ratio = [x / max(w, 1e-12) for x, w in zip(bt, within, strict=True)]
        t_star = _first_merge(ts, ratio, tol)
        pairs[f"{a}|{b}"] = {"a": a, "b": b, "t": t_star, "frac": t_star / T,
                             "level": divergence_level(lineage[a], lineage[b], levels),
                             "ratio_clean": ratio[0]}
    per_level: dict[str, dict] = {}
    for lv in levels:
        vals = [p["t"] for p in pairs.values() if p["level"] == lv]
        if vals:
            per_level[lv] = {"t": int(np.median(vals)), "frac": float(np.median(vals)) / T, "pairs": len(vals)}
    return {
        "num_train_timesteps": T, "t_grid": ts, "tol": tol, "feature_size": feature_size,
        "n_per_taxon": n_per_taxon, "seed": seed, "chips": str(Path(chips).resolve()), "split": split,
        "taxa": {t: {"lineage": lineage[t], "chips": len(by_taxon[t])} for t in taxa},
        "levels": levels, "pairs": pairs, "per_level": per_level,
    }


def _level_order(lineages: list[dict[str, str]]) -> list[str]:
    from synthgen.models import TaxonVocab

    return TaxonVocab.from_lineages(lineages).levels


def _first_merge(ts: list[int], ratio: list[float], tol: float) -> int:
    """First grid t whose between/within ratio is within tol of 1, linearly interpolated."""
    for i, r in enumerate(ratio):
        if r <= 1 + tol:
            if i == 0:
                return 0
            r0 = ratio[i - 1]
            w = (r0 - (1 + tol)) / max(r0 - r, 1e-12)
            return int(round(ts[i - 1] + w * (ts[i] - ts[i - 1])))
    return ts[-1]


def branch_points(model_dir: str | Path, chips: str | Path, progress: bool = True, **kw) -> Path:
    """Compute branch points with the model's noise schedule and size; write them into the model folder."""
    from synthgen.generator import read_index
    from synthgen.schedulers import read_scheduler_config

    model_dir = Path(model_dir)
    read_index(model_dir)
    result = compute_branch_points(chips, read_scheduler_config(model_dir), _sample_size(model_dir),
                                   progress=progress, **kw)
    out = model_dir / BRANCH_FILE
    write_json(out, result)
    return out


def _sample_size(model_dir: Path) -> int:
    """The model's image size from its UNet config (or, for an extended folder, its base's)."""
    cfg = model_dir / "unet" / "config.json"
    if cfg.exists():
        return int(json.loads(cfg.read_text(encoding="utf-8"))["sample_size"])
    from synthgen.models.delta import load_model_folder

    return load_model_folder(model_dir).sample_size


def load_branch_points(model_dir: str | Path) -> dict | None:
    p = Path(model_dir) / BRANCH_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def branch_time(bp: dict, a: str, b: str, lineage_a: dict | None = None, lineage_b: dict | None = None) -> int | None:
    """Timestep where taxa a and b branch: the measured pair, else the median of their divergence level."""
    for key in (f"{a}|{b}", f"{b}|{a}"):
        if key in bp["pairs"]:
            return int(bp["pairs"][key]["t"])
    if lineage_a and lineage_b:
        lv = divergence_level(lineage_a, lineage_b, bp["levels"] + [k for k in lineage_a if k not in bp["levels"]])
        if lv in bp["per_level"]:
            return int(bp["per_level"][lv]["t"])
    return None


def guidance_window(bp: dict, level: str) -> tuple[float, float]:
    """Sampling-step window (0 = noisiest step) in which guidance towards `level` acts: from the step
    where that level branches to the end; before it, the taxa of that level share one branch."""
    if level not in bp["per_level"]:
        return (0.0, 1.0)
    return (round(1.0 - bp["per_level"][level]["frac"], 4), 1.0)


def target_window(bp: dict, diverging: list[str]) -> tuple[tuple[float, float], str] | None:
    """Guidance window for a target steered away from its reference, and the level it comes from.

    `diverging`: the levels (coarse to fine) where the target is defined and its reference is not,
    i.e. where they part. The coarsest of them with a measured branch point decides: before it the
    target and everything under the reference are one branch, so guidance has nothing to push on.
    None when no such level was measured (the data had no pair of taxa branching there)."""
    for lv in diverging:
        if lv in bp["per_level"]:
            return guidance_window(bp, lv), lv
    return None

"""`synthgen evaluate-samples`: how close generated chips are to real held-out chips, per taxon and rank.

Every figure for generated chips is printed beside the same figure for real chips (train vs held-out),
which is the floor a perfect generator would reach with these sample sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthgen.filter import cache_name, embed_pool
from synthgen.io_utils import atomic_write, write_json
from synthgen.metrics.distribution import (
    frechet_distance,
    kid,
    mean_pairwise_distance,
    nearest_distance,
    precision_recall,
)
from synthgen.metrics.lpips import load_lpips, mean_pairwise_lpips
from synthgen.scoring.base import Pool, Scorer, ScoringError, load_image
from synthgen.scoring.judge import _val_split


def _rows(pool: Pool, split: str | None, space_taxa: Sequence[str], what: str) -> list[dict]:
    rows = [r for r in pool.rows if split is None or r.get("split") == split]
    rows = [r for r in rows if r["taxon"] in space_taxa]
    if not rows:
        raise ScoringError(f"{pool.root / 'manifest.jsonl'}: no {what} chips"
                           f"{f' in split {split!r}' if split else ''} with a taxon the scorer knows")
    return rows


def _accuracy(scorer: Scorer, emb: np.ndarray, taxa: Sequence[str]) -> tuple[dict, np.ndarray]:
    """Per level, accuracy of the scorer's prediction vs the intended lineage (over chips whose taxon
    names that level); and per chip, whether the whole intended lineage is predicted."""
    space = scorer.space
    probs = scorer.level_probs(emb)
    pred = scorer.predict(probs)
    per_level = {}
    for lv in space.levels:
        hits = [pred[lv][i] == space.lineage(t)[lv] for i, t in enumerate(taxa) if lv in space.lineage(t)]
        per_level[lv] = {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits)}
    return per_level, scorer.taxon_correct(probs, taxa)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(res: dict) -> str:
    o = res["overall"]
    lines = [f"# Sample quality: {res['generated']}", "",
             f"features: `{res['features']}`; generated {res['n']['generated']}, real held-out "
             f"{res['n']['real']}, train {res['n']['train']} chips"
             + (f"; LPIPS {res['lpips']['net']} from `{res['lpips']['file']}`" if res.get("lpips") else ""), "",
             "| metric | generated vs held-out | real train vs held-out (floor) |", "|---|---|---|"]
    for k, label in (("fd", "Fréchet distance"), ("kid", "KID"), ("precision", "precision (k=3)"),
                     ("recall", "recall (k=3)"), ("diversity", "diversity (mean pairwise cos dist)"),
                     ("nn_train_median", "median nearest-train distance"),
                     ("lpips_diversity", "diversity (mean pairwise LPIPS)"),
                     ("taxon_accuracy", "taxon accuracy (whole lineage right)")):
        if k not in o:  # LPIPS only with a weights file
            continue
        lines.append(f"| {label} | {_fmt(o[k]['generated'])} | {_fmt(o[k]['real'])} |")
    lines.append(f"| share closer to train than 5% of real | {_fmt(o['memorised_share'])} | 0.050 |")
    lines += ["", "| level | accuracy generated | accuracy real held-out |", "|---|---|---|"]
    for lv, d in res["accuracy_per_level"].items():
        lines.append(f"| {lv} | {_fmt(d['generated']['accuracy'])} (n={d['generated']['n']}) | "
                     f"{_fmt(d['real']['accuracy'])} (n={d['real']['n']}) |")
    lp = res.get("lpips") is not None
    head = ["taxon", "n gen", "n real", "FD", "FD floor", "KID", "accuracy gen", "accuracy real", "diversity gen",
            "diversity real"] + (["LPIPS gen", "LPIPS real"] if lp else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, d in res["per_taxon"].items():
        cells = [t, d["n_generated"], d["n_real"]] + [_fmt(d[c]) for c in (
            "fd", "fd_floor", "kid", "accuracy_generated", "accuracy_real", "diversity_generated", "diversity_real")]
        if lp:
            cells += [f"{_fmt(d['lpips_generated'])} ({d['lpips_pairs_generated']} pairs)",
                      f"{_fmt(d['lpips_real'])} ({d['lpips_pairs_real']} pairs)"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def best_worst_png(path: Path, pool: Pool, rows: list[dict], score: np.ndarray, n: int = 4) -> None:
    """Grid: one row per taxon, its n best then n worst scored generated chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taxa = sorted({r["taxon"] for r in rows})
    fig, axes = plt.subplots(len(taxa), 2 * n, figsize=(2 * n * 1.2, len(taxa) * 1.35), squeeze=False)
    for ti, t in enumerate(taxa):
        idx = [i for i, r in enumerate(rows) if r["taxon"] == t]
        idx = sorted(idx, key=lambda i: -np.nan_to_num(score[i], nan=-1))
        picks = idx[:n] + [None] * (n - len(idx[:n])) + (idx[-n:] if len(idx) > n else [None] * n)
        for j, i in enumerate(picks):
            ax = axes[ti][j]
            ax.axis("off")
            if i is not None:
                ax.imshow(load_image(pool.path(rows[i])))
                ax.set_title(f"{score[i]:.2f}", fontsize=6)
        axes[ti][0].text(-0.1, 0.5, t, fontsize=7, ha="right", va="center", transform=axes[ti][0].transAxes)
    fig.suptitle(f"best {n} | worst {n} per taxon (p_taxon)", fontsize=8)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def _lpips_diversity(model, gpool: Pool, g_rows: list[dict], rpool: Pool, r_rows: list[dict], seed: int
                     ) -> dict[str, dict]:
    """Per taxon, mean pairwise LPIPS of generated chips and of real held-out chips (same pair cap and seed)."""
    res = {}
    for t in sorted({r["taxon"] for r in g_rows}):
        g, n_g = mean_pairwise_lpips(model, [gpool.path(r) for r in g_rows if r["taxon"] == t], seed=seed)
        r, n_r = mean_pairwise_lpips(model, [rpool.path(x) for x in r_rows if x["taxon"] == t], seed=seed)
        res[t] = {"lpips_generated": g, "lpips_real": r, "lpips_pairs_generated": n_g, "lpips_pairs_real": n_r}
    return res


def evaluate_samples(generated: str | Path, real: str | Path, scorer: Scorer, out: str | Path,
                     train: str | Path | None = None, k: int = 3, seed: int = 0, lpips: str | Path | None = None,
                     device: str = "auto") -> dict:
    """All sample-quality metrics of a generated pool vs real chips in the scorer's feature space.

    `real`: chips folder whose val/valid split is the held-out reference (all rows if it has no split);
    `train`: chips folder whose train split is the generator's training data (default: `real`).
    `lpips`: local LPIPS weights file; adds mean pairwise LPIPS per taxon (on `device`) beside the
    feature-space diversity. Writes OUT/sample_quality.json, OUT/sample_quality.md and OUT/best_worst.png;
    returns the dict.
    """
    out = Path(out)
    lpips_model = None
    if lpips is not None:  # load first: a bad weights file fails before any embedding work
        lpips_model = load_lpips(lpips, device=device)
    gpool, rpool = Pool.load(generated), Pool.load(real)
    tpool = Pool.load(train) if train else rpool
    known = list(scorer.space.lineages)
    g_rows = _rows(gpool, None, known, "generated")
    r_rows = _rows(rpool, _val_split(rpool.rows), known, "real held-out")
    t_rows = _rows(tpool, "train" if any(r.get("split") == "train" for r in tpool.rows) else None, known, "train")
    cache = out / ".features" / cache_name(scorer)
    ge, gs = embed_pool(scorer, gpool, g_rows, cache / "generated", "generated chips")
    re_, _ = embed_pool(scorer, rpool, r_rows, cache / "real", "real held-out chips")
    te, _ = embed_pool(scorer, tpool, t_rows, cache / "train", "train chips")
    g_taxa, r_taxa, t_taxa = ([r["taxon"] for r in rows] for rows in (g_rows, r_rows, t_rows))
    rng = np.random.default_rng(seed)

    def floor_sample(x: np.ndarray, n: int) -> np.ndarray:  # same sample size as generated: fair floor
        return x[rng.choice(len(x), min(n, len(x)), replace=False)] if len(x) else x

    te_f = floor_sample(te, len(ge))
    acc_g, own_g = _accuracy(scorer, ge, g_taxa)
    acc_r, own_r = _accuracy(scorer, re_, r_taxa)
    nn_g, nn_r = nearest_distance(ge, te), nearest_distance(re_, te)
    p5 = float(np.percentile(nn_r, 5)) if len(nn_r) else float("nan")
    prec, rec = precision_recall(re_, ge, k)
    prec_f, rec_f = precision_recall(re_, te_f, k)
    overall = {
        "fd": {"generated": frechet_distance(ge, re_), "real": frechet_distance(te_f, re_)},
        "kid": {"generated": kid(ge, re_)[0], "real": kid(te_f, re_)[0]},
        "precision": {"generated": prec, "real": prec_f},
        "recall": {"generated": rec, "real": rec_f},
        "diversity": {"generated": float(np.nanmean([mean_pairwise_distance(ge[np.asarray(g_taxa) == t])
                                                     for t in sorted(set(g_taxa))])),
                      "real": float(np.nanmean([mean_pairwise_distance(re_[np.asarray(r_taxa) == t])
                                                for t in sorted(set(r_taxa))]))},
        "nn_train_median": {"generated": float(np.median(nn_g)), "real": float(np.median(nn_r))},
        "taxon_accuracy": {"generated": float(own_g.mean()), "real": float(own_r.mean())},
        "memorised_share": float((nn_g < p5).mean()) if np.isfinite(p5) else None,
    }
    per_taxon = {}
    ga, ra, ta = np.asarray(g_taxa), np.asarray(r_taxa), np.asarray(t_taxa)
    for t in sorted(set(g_taxa)):
        g, r, tr = ge[ga == t], re_[ra == t], te[ta == t]
        tr_f = tr[rng.choice(len(tr), min(len(g), len(tr)), replace=False)] if len(tr) else tr
        per_taxon[t] = {
            "n_generated": int(len(g)), "n_real": int(len(r)), "level": scorer.space.level_of(t),
            "fd": frechet_distance(g, r), "fd_floor": frechet_distance(tr_f, r),
            "kid": kid(g, r, subset_size=200)[0], "kid_floor": kid(tr_f, r, subset_size=200)[0],
            "accuracy_generated": float(own_g[ga == t].mean()),
            "accuracy_real": float(own_r[ra == t].mean()) if (ra == t).any() else None,
            "diversity_generated": mean_pairwise_distance(g), "diversity_real": mean_pairwise_distance(r),
            "nn_train_median_generated": float(np.median(nn_g[ga == t])),
            "nn_train_median_real": float(np.median(nn_r[ra == t])) if (ra == t).any() else None,
        }
    if lpips_model is not None:
        lp = _lpips_diversity(lpips_model, gpool, g_rows, rpool, r_rows, seed)
        for t, d in lp.items():
            per_taxon[t].update(d)
        overall["lpips_diversity"] = {w: float(np.nanmean([d[f"lpips_{w}"] for d in lp.values()]))
                                      for w in ("generated", "real")}
    res = {
        "generated": str(gpool.root), "real": str(rpool.root), "train": str(tpool.root),
        "features": scorer.ident or scorer.name, "k": k,
        "lpips": None if lpips_model is None else {"file": str(lpips), "net": lpips_model.pnet_type},
        "n": {"generated": len(g_rows), "real": len(r_rows), "train": len(t_rows)},
        "overall": overall,
        "accuracy_per_level": {lv: {"generated": acc_g[lv], "real": acc_r[lv]} for lv in scorer.space.levels},
        "per_taxon": per_taxon,
    }
    write_json(out / "sample_quality.json", res)
    with atomic_write(out / "sample_quality.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    key = f"{scorer.name}.p_taxon"
    best_worst_png(out / "best_worst.png", gpool, g_rows, np.array([gs[r["file"]][key] for r in g_rows]))
    return res

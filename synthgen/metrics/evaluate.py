"""`synthgen evaluate-samples`: how close generated chips are to real held-out chips, per taxon and rank.

Every figure for generated chips is printed beside the same figure for real chips (train vs held-out),
which is the floor a perfect generator would reach with these sample sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthgen.features import FeatureExtractor, extract
from synthgen.io_utils import atomic_write, write_json
from synthgen.metrics.distribution import (
    frechet_distance,
    kid,
    mean_pairwise_distance,
    nearest_distance,
    precision_recall,
)
from synthgen.metrics.lpips import load_lpips, mean_pairwise_lpips
from synthgen.metrics.realism import two_sample_accuracy
from synthgen.scoring.base import Pool, Scorer, ScoringError, load_image, split_by_source
from synthgen.scoring.judge import held_out_split


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
             + (f"; LPIPS {res['lpips']['net']} from `{res['lpips']['file']}`" if res.get("lpips") else ""), ""]
    if res.get("held_out"):
        lines += [f"Note: {res['held_out']}.", ""]
    ts = o["two_sample"]
    lines += ["| metric | generated vs held-out | real train vs held-out (floor) |", "|---|---|---|",
              f"| two-sample classifier accuracy (0.5 = indistinguishable; 95% interval) | {_fmt(ts['generated'])} "
              f"[{_fmt(ts['interval_generated'][0])}, {_fmt(ts['interval_generated'][1])}] | {_fmt(ts['real'])} "
              f"[{_fmt(ts['interval_real'][0])}, {_fmt(ts['interval_real'][1])}] |"]
    for key, label in (("fd", "Fréchet distance"), ("kid", "KID"), ("precision", "precision (k=3)"),
                       ("recall", "recall (k=3)"), ("diversity", "diversity (mean pairwise cos dist)"),
                       ("nn_train_median", "median nearest-train distance"),
                       ("lpips_diversity", "diversity (mean pairwise LPIPS)"),
                       ("taxon_accuracy", "taxon accuracy (whole lineage right)")):
        if key not in o:  # LPIPS only with a weights file, accuracy only with a judge
            continue
        lines.append(f"| {label} | {_fmt(o[key]['generated'])} | {_fmt(o[key]['real'])} |")
    lines.append(f"| share closer to train than 5% of real | {_fmt(o['memorised_share'])} | 0.050 |")
    if res.get("accuracy_per_level"):
        lines += ["", f"Accuracy by `{res['judge']}`:", "",
                  "| level | accuracy generated | accuracy real held-out |", "|---|---|---|"]
        for lv, d in res["accuracy_per_level"].items():
            lines.append(f"| {lv} | {_fmt(d['generated']['accuracy'])} (n={d['generated']['n']}) | "
                         f"{_fmt(d['real']['accuracy'])} (n={d['real']['n']}) |")
    lp, acc = res.get("lpips") is not None, res.get("accuracy_per_level") is not None
    cols = ["fd", "fd_floor", "kid"] + (["accuracy_generated", "accuracy_real"] if acc else []) + [
        "diversity_generated", "diversity_real"]
    head = ["taxon", "n gen", "n real", "FD", "FD floor", "KID"] + (["accuracy gen", "accuracy real"] if acc else []) + [
        "diversity gen", "diversity real"] + (["LPIPS gen", "LPIPS real"] if lp else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, d in res["per_taxon"].items():
        cells = [t, d["n_generated"], d["n_real"]] + [_fmt(d[c]) for c in cols]
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


def _held_out(rpool: Pool, tpool: Pool, known: Sequence[str], val_fraction: float) -> tuple[list, list, str | None]:
    """(real held-out rows, train rows, note). Without a val split in the real folder, and no separate
    train folder, whole source images are split off as held-out (and the note says so): comparing the
    training chips with themselves would make the floor meaningless."""
    vsplit = held_out_split(rpool.rows)
    has_train = any(r.get("split") == "train" for r in tpool.rows)
    t_rows = _rows(tpool, "train" if has_train else None, known, "train")
    if vsplit:
        return _rows(rpool, vsplit, known, "real held-out"), t_rows, None
    if rpool.root.resolve() != tpool.root.resolve():
        return _rows(rpool, None, known, "real held-out"), t_rows, None
    t_rows, r_rows = split_by_source(t_rows, val_fraction)
    if not t_rows or not r_rows:
        raise ScoringError(f"{rpool.root / 'manifest.jsonl'}: no val/valid split, and too few source images to "
                           "hold some out; pass --train with the generator's chips, or cut chips with --split all")
    return r_rows, t_rows, (f"{rpool.root} has no val split: {len(r_rows)} chips of {val_fraction:.0%} of its "
                            "source images were held out as the real reference")


def evaluate_samples(generated: str | Path, real: str | Path, features: FeatureExtractor, out: str | Path,
                     train: str | Path | None = None, k: int = 3, seed: int = 0, lpips: str | Path | None = None,
                     device: str = "auto", judge: Scorer | None = None, val_fraction: float = 0.2,
                     cache: Path | None = None) -> dict:
    """All sample-quality metrics of a generated pool vs real chips in a feature space (ImageNet
    EfficientNet-Lite0 by default; a judge or BioCLIP scorer works too).

    `real`: chips folder whose val/valid split is the held-out reference; without one (and no separate
    `train`), `val_fraction` of its source images are held out. `train`: chips folder whose train split
    trained the generator (default: `real`). `judge`: a scorer for per-rank accuracy and the best/worst
    grid (default: `features` when it is a scorer). `lpips`: local LPIPS weights file; adds mean pairwise
    LPIPS per taxon. Features are cached per file content (`cache`, default synthgen.features.default_cache).
    Writes OUT/sample_quality.json, OUT/sample_quality.md (and OUT/best_worst.png with a judge).
    """
    out = Path(out)
    lpips_model = None
    if lpips is not None:  # load first: a bad weights file fails before any embedding work
        lpips_model = load_lpips(lpips, device=device)
    judge = judge if judge is not None else (features if isinstance(features, Scorer) else None)
    gpool, rpool = Pool.load(generated), Pool.load(real)
    tpool = Pool.load(train) if train else rpool
    known = list(judge.space.lineages) if judge else sorted({r["taxon"] for r in rpool.rows + tpool.rows})
    g_rows = _rows(gpool, None, known, "generated")
    r_rows, t_rows, note = _held_out(rpool, tpool, known, val_fraction)

    def feats(fx: FeatureExtractor, pool: Pool, rows: list[dict], what: str) -> np.ndarray:
        return extract(fx, [pool.path(r) for r in rows], cache, what)

    ge, re_, te = (feats(features, p, rows, w) for p, rows, w in (
        (gpool, g_rows, "generated chips"), (rpool, r_rows, "real held-out chips"), (tpool, t_rows, "train chips")))
    g_taxa, r_taxa, t_taxa = ([r["taxon"] for r in rows] for rows in (g_rows, r_rows, t_rows))
    rng = np.random.default_rng(seed)

    def floor_sample(x: np.ndarray, n: int) -> np.ndarray:  # same sample size as generated: fair floor
        return x[rng.choice(len(x), min(n, len(x)), replace=False)] if len(x) else x

    te_f = floor_sample(te, len(ge))
    nn_g, nn_r = nearest_distance(ge, te), nearest_distance(re_, te)
    p5 = float(np.percentile(nn_r, 5)) if len(nn_r) else float("nan")
    prec, rec = precision_recall(re_, ge, k)
    prec_f, rec_f = precision_recall(re_, te_f, k)
    c2st_g, c2st_f = two_sample_accuracy(re_, ge, seed=seed), two_sample_accuracy(re_, te_f, seed=seed)
    overall = {
        "two_sample": {"generated": c2st_g["accuracy"], "real": c2st_f["accuracy"],
                       "interval_generated": c2st_g["interval"], "interval_real": c2st_f["interval"]},
        "fd": {"generated": frechet_distance(ge, re_), "real": frechet_distance(te_f, re_)},
        "kid": {"generated": kid(ge, re_)[0], "real": kid(te_f, re_)[0]},
        "precision": {"generated": prec, "real": prec_f},
        "recall": {"generated": rec, "real": rec_f},
        "diversity": {"generated": float(np.nanmean([mean_pairwise_distance(ge[np.asarray(g_taxa) == t])
                                                     for t in sorted(set(g_taxa))])),
                      "real": float(np.nanmean([mean_pairwise_distance(re_[np.asarray(r_taxa) == t])
                                                for t in sorted(set(r_taxa))]))},
        "nn_train_median": {"generated": float(np.median(nn_g)), "real": float(np.median(nn_r))},
        "memorised_share": float((nn_g < p5).mean()) if np.isfinite(p5) else None,
    }
    own_g = own_r = None
    if judge is not None:
        jg, jr = ((ge, re_) if judge is features else
                  (feats(judge, gpool, g_rows, "generated chips"), feats(judge, rpool, r_rows, "real held-out chips")))
        acc_g, own_g = _accuracy(judge, jg, g_taxa)
        acc_r, own_r = _accuracy(judge, jr, r_taxa)
        overall["taxon_accuracy"] = {"generated": float(own_g.mean()), "real": float(own_r.mean())}
    per_taxon = {}
    ga, ra, ta = np.asarray(g_taxa), np.asarray(r_taxa), np.asarray(t_taxa)
    for t in sorted(set(g_taxa)):
        g, r, tr = ge[ga == t], re_[ra == t], te[ta == t]
        tr_f = tr[rng.choice(len(tr), min(len(g), len(tr)), replace=False)] if len(tr) else tr
        per_taxon[t] = {
            "n_generated": int(len(g)), "n_real": int(len(r)),
            "fd": frechet_distance(g, r), "fd_floor": frechet_distance(tr_f, r),
            "kid": kid(g, r, subset_size=200)[0], "kid_floor": kid(tr_f, r, subset_size=200)[0],
            "diversity_generated": mean_pairwise_distance(g), "diversity_real": mean_pairwise_distance(r),
            "nn_train_median_generated": float(np.median(nn_g[ga == t])),
            "nn_train_median_real": float(np.median(nn_r[ra == t])) if (ra == t).any() else None,
        }
        if judge is not None:
            per_taxon[t] |= {"level": judge.space.level_of(t), "accuracy_generated": float(own_g[ga == t].mean()),
                             "accuracy_real": float(own_r[ra == t].mean()) if (ra == t).any() else None}
    if lpips_model is not None:
        lp = _lpips_diversity(lpips_model, gpool, g_rows, rpool, r_rows, seed)
        for t, d in lp.items():
            per_taxon[t].update(d)
        overall["lpips_diversity"] = {w: float(np.nanmean([d[f"lpips_{w}"] for d in lp.values()]))
                                      for w in ("generated", "real")}
    res = {
        "generated": str(gpool.root), "real": str(rpool.root), "train": str(tpool.root),
        "features": features.ident or features.name, "judge": (judge.ident or judge.name) if judge else None,
        "held_out": note, "k": k,
        "lpips": None if lpips_model is None else {"file": str(lpips), "net": lpips_model.pnet_type},
        "n": {"generated": len(g_rows), "real": len(r_rows), "train": len(t_rows)},
        "overall": overall,
        "accuracy_per_level": ({lv: {"generated": acc_g[lv], "real": acc_r[lv]} for lv in judge.space.levels}
                               if judge else None),
        "per_taxon": per_taxon,
    }
    write_json(out / "sample_quality.json", res)
    with atomic_write(out / "sample_quality.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    if judge is not None:
        p = judge.intended_probs(judge.level_probs(jg), g_taxa)["p_taxon"]
        best_worst_png(out / "best_worst.png", gpool, g_rows, p)
    return res

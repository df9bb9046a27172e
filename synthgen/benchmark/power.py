"""Intervals for the paired difference arm − real-only that account for both noise sources.

Why: with a few seeds, the seed-to-seed spread (a different real subset and training run) and the
sampling of the test images both move mAP50 by points. A bootstrap that resamples the test images
(one draw shared by every model, so the pairing holds) and the paired seeds together gives a 95 %
interval; an arm is said to help only when that interval excludes zero.

Matching is per image, so each prediction's TP flag at IoU 0.5 is computed once; a bootstrap replicate
only reweights images, and AP50 is recomputed from weighted cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from detection.metrics import RECALL_POINTS, XYXY, match_boxes


@dataclass
class ImageFlags:
    """Per class: prediction image index, score and TP flag (score-sorted); GT boxes per image."""

    classes: list[str]
    img: list[np.ndarray]
    tp: list[np.ndarray]
    n_gt: np.ndarray  # (n_images, n_classes)


def image_flags(gt: pd.DataFrame, pred: pd.DataFrame, images: list[str], names: list[str],
                max_dets: int = 300) -> ImageFlags:
    """TP flags at IoU 0.5 with the same greedy matching and max_dets as `detection.metrics.evaluate`."""
    pos = {p: i for i, p in enumerate(images)}
    gt = gt[gt.image_path.isin(pos)]
    pred = pred[pred.image_path.isin(pos)].sort_values("score", ascending=False, kind="mergesort")
    pred = pred.groupby("image_path", sort=False).head(max_dets)
    n_gt = np.zeros((len(images), len(names)))
    imgs, tps = [], []
    for ci, c in enumerate(names):
        g_c, p_c = gt[gt.label.astype(str) == c], pred[pred.label.astype(str) == c]
        g_by = {k: v[XYXY].to_numpy(float) for k, v in g_c.groupby("image_path")}
        for k, v in g_by.items():
            n_gt[pos[k], ci] = len(v)
        rows = []
        for k, p in p_c.groupby("image_path", sort=False):
            t = match_boxes(p[XYXY].to_numpy(float), g_by.get(k, np.zeros((0, 4))), 0.5)
            rows.append(pd.DataFrame({"img": pos[k], "score": p.score.to_numpy(float), "tp": t}))
        df = pd.concat(rows) if rows else pd.DataFrame({"img": [], "score": [], "tp": []})
        df = df.sort_values("score", ascending=False, kind="mergesort")
        imgs.append(df.img.to_numpy(int))
        tps.append(df.tp.to_numpy(bool))
    return ImageFlags(list(names), imgs, tps, n_gt)


def weighted_map50(f: ImageFlags, w: np.ndarray) -> float:
    """mAP50 with image i counted w[i] times (w = 1 everywhere gives `evaluate`'s map50)."""
    n_gt = w @ f.n_gt
    aps = []
    for ci in range(len(f.classes)):
        if n_gt[ci] <= 0:
            continue
        wi = w[f.img[ci]]
        ctp = np.cumsum(wi * f.tp[ci])
        cfp = np.cumsum(wi * ~f.tp[ci])
        if len(ctp) == 0:
            aps.append(0.0)
            continue
        recall = ctp / n_gt[ci]
        precision = np.maximum.accumulate((ctp / np.maximum(ctp + cfp, 1e-12))[::-1])[::-1]
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")
        aps.append(float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean()))
    return float(np.mean(aps)) if aps else float("nan")


def paired_interval(arm: dict[int, ImageFlags], base: dict[int, ImageFlags], n_images: int, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Mean over paired seeds of mAP50(arm) − mAP50(base), with a bootstrap interval over test images
    (shared by all models) and seeds (resampled pairs). `arm`/`base`: seed -> flags."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "half_width": float("nan"), "n_seeds": 0}
    ones = np.ones(n_images)
    point = float(np.mean([weighted_map50(arm[s], ones) - weighted_map50(base[s], ones) for s in seeds]))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(float)
        d = np.array([weighted_map50(arm[s], w) - weighted_map50(base[s], w) for s in seeds])
        reps[b] = np.nanmean(d[rng.integers(0, len(seeds), len(seeds))])
    lo, hi = np.nanquantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2),
            "n_seeds": len(seeds)}

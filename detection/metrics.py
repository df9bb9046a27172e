"""Detection metrics computed from prediction tables: COCO-style mAP, PRF1 at one IoU, count error.

Our own evaluator (instead of ultralytics' val) so that every arm of the benchmark, and sliced
inference on large frames, is scored by exactly the same code on exactly the same test images.

Tables follow the canonical `detection` box table: columns image_path, xmin, ymin, xmax, ymax,
label (predictions add `score`). Images without any box still count (false positives, count error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
XYXY = ["xmin", "ymin", "xmax", "ymax"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N,4) and (M,4) xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_boxes(pred: np.ndarray, gt: np.ndarray, thr: float) -> np.ndarray:
    """COCO greedy matching: predictions by descending score each take the best-IoU unmatched gt.

    `pred` must already be sorted by score (descending). Returns a bool TP flag per prediction."""
    tp = np.zeros(len(pred), dtype=bool)
    if len(pred) == 0 or len(gt) == 0:
        return tp
    iou = box_iou(pred, gt)
    taken = np.zeros(len(gt), dtype=bool)
    for i in range(len(pred)):
        cand = np.where(~taken & (iou[i] >= thr), iou[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= 0:
            taken[j] = True
            tp[i] = True
    return tp


def _ap_from_flags(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP (COCO) from per-prediction TP flags pooled over images."""
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    # precision envelope: max precision at any recall >= r
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.array([precision[i] if i < len(precision) else 0.0 for i in idx])
    return float(q.mean())


def _group(df: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    return {k: g for k, g in df.groupby(["image_path", "label"], sort=False)} if len(df) else {}


@dataclass
class DetectionMetrics:
    """All figures the benchmark reports for one model on one test set."""

    map50: float
    map50_95: float
    ap50_per_class: dict[str, float]
    ap_per_class: dict[str, float]  # AP@[.5:.95]
    precision: float  # at `iou_prf`, predictions with score >= conf
    recall: float
    f1: float
    count_mae: float  # mean |n_pred - n_gt| per image
    count_bias: float  # mean (n_pred - n_gt) per image
    n_images: int
    n_gt: int
    iou_prf: float = 0.4
    conf: float = 0.25
    n_gt_per_class: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    gt: pd.DataFrame,
    pred: pd.DataFrame,
    images: Iterable[str] | None = None,
    names: Sequence[str] | None = None,
    iou_prf: float = 0.4,
    conf: float = 0.25,
    max_dets: int = 300,
) -> DetectionMetrics:
    """Score predictions against ground truth.

    mAP: COCO-style, class-aware, per class pooled over images, 101-point interpolation, IoU
    0.50:0.95, at most `max_dets` highest-scoring predictions per image, classes without ground
    truth excluded from the mean. PRF1 and count error use predictions with score >= `conf`
    matched at IoU >= `iou_prf` (0.4: the usual wildlife-survey tolerance for small animals)."""
    cols = ["image_path", "xmin", "ymin", "xmax", "ymax", "label"]
    gt = gt[cols].copy() if len(gt) else pd.DataFrame(columns=cols)
    pred = pred[[*cols, "score"]].copy() if len(pred) else pd.DataFrame(columns=[*cols, "score"])
    gt["label"] = gt["label"].astype(str)
    pred["label"] = pred["label"].astype(str)
    image_set = list(dict.fromkeys(images)) if images is not None else sorted(set(gt.image_path))
    keep = set(image_set)
    gt = gt[gt.image_path.isin(keep)]
    pred = pred[pred.image_path.isin(keep)]
    if len(pred):  # max_dets per image, highest scores first
        pred = pred.sort_values("score", ascending=False, kind="mergesort")
        pred = pred.groupby("image_path", sort=False).head(max_dets)
    classes = list(names) if names is not None else sorted(set(gt.label) | set(pred.label))

    g_by, p_by = _group(gt), _group(pred)
    ap = np.full((len(classes), len(IOU_THRESHOLDS)), np.nan)
    n_gt_cls = {}
    for ci, c in enumerate(classes):
        keys = [k for k in set(g_by) | set(p_by) if k[1] == c]
        n_gt_cls[c] = int(sum(len(g_by[k]) for k in keys if k in g_by))
        per_img = []  # (sorted scores, sorted pred boxes, gt boxes) per image of this class
        for k in keys:
            if k in p_by:
                p = p_by[k].sort_values("score", ascending=False, kind="mergesort")
                g = g_by[k][XYXY].to_numpy(float) if k in g_by else np.zeros((0, 4))
                per_img.append((p.score.to_numpy(float), p[XYXY].to_numpy(float), g))
        scores = np.concatenate([s for s, _, _ in per_img] or [np.zeros(0)])
        for ti, thr in enumerate(IOU_THRESHOLDS):
            tp = np.concatenate([match_boxes(b, g, thr) for _, b, g in per_img] or [np.zeros(0, dtype=bool)])
            ap[ci, ti] = _ap_from_flags(scores, tp, n_gt_cls[c])

    # PRF1 + counts at the operating point
    op = pred[pred.score >= conf]
    o_by = _group(op)
    tp_n = fp_n = 0
    for k, p in o_by.items():
        g = g_by[k][XYXY].to_numpy(float) if k in g_by else np.zeros((0, 4))
        p = p.sort_values("score", ascending=False, kind="mergesort")
        t = match_boxes(p[XYXY].to_numpy(float), g, iou_prf)
        tp_n += int(t.sum())
        fp_n += int((~t).sum())
    n_gt_all = len(gt)
    precision = tp_n / (tp_n + fp_n) if tp_n + fp_n else 0.0
    recall = tp_n / n_gt_all if n_gt_all else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_pred_img = op.groupby("image_path").size().reindex(image_set, fill_value=0).to_numpy()
    n_gt_img = gt.groupby("image_path").size().reindex(image_set, fill_value=0).to_numpy()
    diff = n_pred_img - n_gt_img

    valid = [ci for ci, c in enumerate(classes) if n_gt_cls[c] > 0]
    mean50 = float(np.mean(ap[valid, 0])) if valid else float("nan")
    mean = float(np.mean(ap[valid].mean(1))) if valid else float("nan")
    return DetectionMetrics(
        map50=mean50,
        map50_95=mean,
        ap50_per_class={c: float(ap[ci, 0]) for ci, c in enumerate(classes)},
        ap_per_class={c: float(ap[ci].mean()) for ci, c in enumerate(classes)},
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        count_mae=float(np.abs(diff).mean()) if len(diff) else 0.0,
        count_bias=float(diff.mean()) if len(diff) else 0.0,
        n_images=len(image_set),
        n_gt=n_gt_all,
        iou_prf=iou_prf,
        conf=conf,
        n_gt_per_class=n_gt_cls,
    )


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation and n over seeds (NaNs dropped)."""
    v = np.array([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def paired_differences(
    rows: pd.DataFrame, metric: str, baseline: str = "real", keys: Sequence[str] = ("fraction", "seed")
) -> pd.DataFrame:
    """Per arm and fraction: metric(arm) - metric(baseline) paired on the same fraction and seed.

    `rows` has one row per trained model with columns arm, fraction, seed and `metric`. Pairing
    removes the seed-to-seed variance of the real subset, which dominates at small fractions.
    Returns columns arm, fraction, mean_diff, std_diff, n_pairs, wins (pairs where arm > baseline)."""
    base = rows[rows.arm == baseline].set_index(list(keys))[metric]
    out = []
    for (arm, frac), g in rows[rows.arm != baseline].groupby(["arm", "fraction"], sort=True):
        d = []
        for _, r in g.iterrows():
            k = tuple(r[list(keys)])
            if k in base.index and not np.isnan(r[metric]) and not np.isnan(base.loc[k]):
                d.append(float(r[metric] - base.loc[k]))
        s = summarize(d)
        out.append(
            {"arm": arm, "fraction": frac, "mean_diff": s["mean"], "std_diff": s["std"], "n_pairs": s["n"],
             "wins": int(sum(x > 0 for x in d))}
        )
    return pd.DataFrame(out, columns=["arm", "fraction", "mean_diff", "std_diff", "n_pairs", "wins"])

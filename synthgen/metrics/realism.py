"""How real do generated images look, in one call: a two-sample classifier (can a logistic regression
tell them from real ones?), FD, KID and k-NN precision/recall, in ImageNet EfficientNet-Lite0 features
by default, beside the same figures for real vs real (the floor a perfect generator reaches).

`realism(real_images, generated_images)` takes image files or PIL images; features are cached per
file content (synthgen.features.extract), so the real side is embedded once across calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.metrics.distribution import frechet_distance, kid, precision_recall


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0, 1 and small n)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _logistic_fit_predict(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, l2: float) -> np.ndarray:
    """L2-regularised logistic regression (full-batch L-BFGS on standardised features); test labels."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd).double()
    yt = torch.from_numpy(y).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 / len(y) * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = torch.from_numpy((x_test - mu) / sd).double() @ w + b
    return (logits > 0).numpy().astype(np.int64)


def two_sample_accuracy(a: np.ndarray, b: np.ndarray, folds: int = 5, seed: int = 0, l2: float = 1.0) -> dict:
    """Out-of-fold accuracy of a logistic regression telling `a` from `b` (stratified k-fold, the larger
    side subsampled to the smaller so chance is 0.5), with a 95% Wilson interval over all predictions.
    0.5 = indistinguishable; 1.0 = always told apart."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(len(a), len(b))
    if m < folds:
        return {"accuracy": float("nan"), "interval": [float("nan")] * 2, "n": 2 * m, "folds": folds}
    rng = np.random.default_rng(seed)
    a, b = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
    x, y = np.concatenate([a, b]), np.repeat([0, 1], m)
    fold = np.concatenate([rng.permutation(np.arange(m) % folds), rng.permutation(np.arange(m) % folds)])
    correct = 0
    per_fold = []
    for k in range(folds):
        te = fold == k
        pred = _logistic_fit_predict(x[~te], y[~te], x[te], l2)
        correct += int((pred == y[te]).sum())
        per_fold.append(float((pred == y[te]).mean()))
    lo, hi = wilson_interval(correct, len(y))
    return {"accuracy": correct / len(y), "interval": [lo, hi], "fold_sd": float(np.std(per_fold, ddof=1)),
            "n": len(y), "folds": folds}


def compare(real: np.ndarray, other: np.ndarray, k: int = 3, seed: int = 0) -> dict:
    """Every realism figure of `other` against `real` in one feature space."""
    prec, rec = precision_recall(real, other, k)
    # 20 subsets, not KID's usual 50-100: each is three m x m x 1280 kernels, the costliest step on a CPU
    kid_mean, kid_sd = kid(real, other, subsets=20, subset_size=min(1000, len(real), len(other)), seed=seed)
    return {"two_sample": two_sample_accuracy(real, other, seed=seed), "fd": frechet_distance(real, other),
            "kid": {"mean": kid_mean, "sd": kid_sd}, "precision": prec, "recall": rec,
            "n_real": len(real), "n_other": len(other)}


def realism(real_images: Sequence[Path | str | Image.Image], generated_images: Sequence[Path | str | Image.Image],
            features=None, cache: Path | None = None, k: int = 3, seed: int = 0, floor: bool = True) -> dict:
    """Realism of generated images against real ones, with the real-vs-real floor.

    Returns {"features": ident, "generated": {...}, "floor": {...} | None}, each part holding
    `two_sample` (accuracy, 95% interval, n), `fd`, `kid` (mean, sd over subsets), `precision`,
    `recall`. `generated` compares all real with all generated images; `floor` compares two disjoint
    random halves of the real images (FD and KID shrink with sample size, so compare like with like).
    `features`: any FeatureExtractor (default ImageNet EfficientNet-Lite0, offline)."""
    from synthgen.features import ImageNetFeatures, extract

    if len(real_images) < 2 * k + 2 or len(generated_images) < k + 1:
        raise SynthgenError(f"realism needs at least {2 * k + 2} real and {k + 1} generated images, got "
                            f"{len(real_images)} and {len(generated_images)}")
    fx = features or ImageNetFeatures()
    r = extract(fx, list(real_images), cache, "real images")
    g = extract(fx, list(generated_images), cache, "generated images")
    out = {"features": fx.ident, "generated": compare(r, g, k, seed), "floor": None}
    if floor:
        perm = np.random.default_rng(seed).permutation(len(r))
        half = len(r) // 2
        out["floor"] = compare(r[perm[:half]], r[perm[half:2 * half]], k, seed)
    return out

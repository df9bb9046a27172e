"""Sample-quality statistics on feature vectors: Fréchet distance, KID, k-NN precision/recall,
diversity and memorisation. Pure numpy/scipy so they are checkable by hand."""

from __future__ import annotations

import numpy as np
from scipy import linalg

from synthgen.errors import SynthgenError


def _f64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise SynthgenError(f"features must be a 2-D array, got shape {x.shape}")
    return x


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca Cb)^1/2) between Gaussians fitted to two feature sets."""
    a, b = _f64(a), _f64(b)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():  # singular product: regularise as in the reference FID code
        off = np.eye(c1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((c1 + off) @ (c2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, mean and std over subsets."""
    a, b = _f64(a), _f64(b)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        return float("nan"), float("nan")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d, 0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fake inside the real k-NN manifold,
    recall = share of real inside the fake k-NN manifold (radius = distance to the k-th neighbour)."""
    real, fake = _f64(real), _f64(fake)
    if len(real) <= k or len(fake) <= k:
        return float("nan"), float("nan")

    def radii(x: np.ndarray) -> np.ndarray:
        return np.sort(_pairwise(x, x), axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    precision = float((_pairwise(fake, real) <= r_real[None, :]).any(1).mean())
    recall = float((_pairwise(real, fake) <= r_fake[None, :]).any(1).mean())
    return precision, recall


def mean_pairwise_distance(x: np.ndarray, cosine: bool = True) -> float:
    """Diversity: mean distance over distinct pairs (cosine distance by default)."""
    x = _f64(x)
    if len(x) < 2:
        return float("nan")
    if cosine:
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
        d = 1 - x @ x.T
    else:
        d = _pairwise(x, x)
    n = len(x)
    return float((d.sum() - np.trace(d)) / (n * (n - 1)))


def nearest_distance(query: np.ndarray, ref: np.ndarray, cosine: bool = True) -> np.ndarray:
    """Per query row, distance to its nearest reference row (memorisation check)."""
    q, r = _f64(query), _f64(ref)
    if not len(q) or not len(r):
        return np.zeros(len(q))
    if cosine:
        q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-12)
        r = r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-12)
        return 1 - (q @ r.T).max(1)
    return _pairwise(q, r).min(1)

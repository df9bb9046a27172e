"""Instance size: what size would this taxon have in this tile? Either the dataset's own per-taxon
box sizes (kernel-jittered so pasted sizes are not copies of a few values), or physical size
(body length over ground sample distance) for georeferenced backgrounds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from synthgen.errors import SynthgenError


class DatasetSizes:
    """Per-label (w, h) of the real boxes; `sample` draws one and jitters it log-normally."""

    def __init__(self, boxes: pd.DataFrame, jitter: float = 0.15, fallback: dict[str, float] | None = None):
        self.jitter = jitter
        self.sizes: dict[str, np.ndarray] = {k: np.array([float(v)]) for k, v in (fallback or {}).items()}
        if len(boxes):
            w = (boxes.xmax - boxes.xmin).to_numpy(float)
            h = (boxes.ymax - boxes.ymin).to_numpy(float)
            for lab in boxes.label.unique():
                sel = (boxes.label == lab).to_numpy() & (w > 1) & (h > 1)
                if sel.any():
                    self.sizes[str(lab)] = np.sqrt(w[sel] * h[sel])

    def sample(self, label: str, rng: np.random.Generator) -> float:
        """A target sqrt(box area) in pixels."""
        s = self.sizes.get(label)
        if s is None or not len(s):
            raise SynthgenError(f"no real boxes of label {label!r} in the background dataset to take a size from; "
                                "use scale.size_px, scale.mode: physical or labelled tiles")
        return float(s[rng.integers(len(s))] * math.exp(rng.normal(0.0, self.jitter)))


def gsd_from_transform(transform, path: str) -> float:
    """Ground sample distance (map units per pixel) of a raster; error if it has no georeference."""
    if transform is None or transform.is_identity:
        raise SynthgenError(f"{path}: no geotransform/CRS, so physical scale (body length / GSD) is impossible; "
                            "use scale.mode: dataset or a georeferenced GeoTIFF")
    return float(math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)))


def physical_length_px(body_length_m: float, gsd: float, rng: np.random.Generator, jitter: float) -> float:
    """Body length in pixels with log-normal jitter (individual size variation + posture)."""
    return body_length_m / gsd * math.exp(rng.normal(0.0, jitter))

"""Segment the animal in a generated full frame and cut it out as an RGBA chip for the compositor.

GrabCut seeded with "the border is background" needs no extra model and works for the single,
roughly centred subject a prompt like "a photo of a harbor seal" produces. When it fails (empty
or whole-frame mask) the full frame is kept and the row says `cut: false`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from synthgen.latent.config import CutConfig


@dataclass
class Cut:
    chip: Image.Image  # RGBA, cropped to the instance (+ pad)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the full frame
    area: float  # mask area / frame area
    ok: bool


def segment(rgb: np.ndarray, cfg: CutConfig) -> np.ndarray:
    """Foreground mask (bool HxW): GrabCut from a border rectangle, largest connected component."""
    h, w = rgb.shape[:2]
    mx, my = max(1, round(w * cfg.margin)), max(1, round(h * cfg.margin))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), mask, (mx, my, w - 2 * mx, h - 2 * my), bgd, fgd,
                    cfg.iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return np.zeros((h, w), bool)  # degenerate (e.g. flat) image: no model of fore/background
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def cut_instance(image: Image.Image, cfg: CutConfig) -> Cut:
    """RGBA chip of the largest foreground region, or the whole frame when segmentation fails."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    mask = segment(rgb, cfg)
    area = float(mask.mean())
    if not (cfg.min_area <= area <= 1 - cfg.min_area):
        return Cut(image.convert("RGBA"), (0, 0, w, h), area, False)
    ys, xs = np.nonzero(mask)
    x0, y0 = max(0, xs.min() - cfg.pad), max(0, ys.min() - cfg.pad)
    x1, y1 = min(w, xs.max() + 1 + cfg.pad), min(h, ys.max() + 1 + cfg.pad)
    alpha = (mask * 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])[y0:y1, x0:x1]
    return Cut(Image.fromarray(rgba, "RGBA"), (int(x0), int(y0), int(x1), int(y1)), area, True)

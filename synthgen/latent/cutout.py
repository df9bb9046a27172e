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
    chip: Image.Image  # RGBA square around the instance; alpha = the mask
    box: tuple[int, int, int, int]  # instance x0, y0, x1, y1 in the full frame
    chip_box: tuple[int, int, int, int]  # the square chip's extent in the full frame
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


def square_around(box: tuple[int, int, int, int], context: float, w: int, h: int) -> tuple[int, int, int, int]:
    """Square of side max(bw, bh) * (1 + 2 context) centred on `box`, shifted (then clipped) into the frame,
    the geometry `synthgen data chips` uses, so the compositor's chip masking applies unchanged."""
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * context), w, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    s = int(round(side))
    return left, top, min(w, left + s), min(h, top + s)


def cut_instance(image: Image.Image, cfg: CutConfig) -> Cut:
    """RGBA chip around the largest foreground region, or the whole frame when segmentation fails."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    mask = segment(rgb, cfg)
    area = float(mask.mean())
    if not (cfg.min_area <= area <= 1 - cfg.min_area):
        return Cut(image.convert("RGBA"), (0, 0, w, h), (0, 0, w, h), area, False)
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    cx0, cy0, cx1, cy1 = square_around(box, cfg.context, w, h)
    rgba = np.dstack([rgb, (mask * 255).astype(np.uint8)])[cy0:cy1, cx0:cx1]
    return Cut(Image.fromarray(np.ascontiguousarray(rgba), "RGBA"), box, (cx0, cy0, cx1, cy1), area, True)

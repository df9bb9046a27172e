"""Foreground alpha for instance chips: a chip holds the animal plus background, and the label
must be the tight box of the animal, so every pool item gets a checked mask before pasting."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from synthgen.compose.config import MaskConfig
from synthgen.io_utils import atomic_save_image, write_json


@dataclass
class MaskResult:
    """Binary mask (uint8 0/255, chip size), the method that produced it, and why it was rejected."""

    mask: np.ndarray | None
    method: str
    reason: str | None = None


def central_box(h: int, w: int, margin: float) -> tuple[int, int, int, int]:
    """The animal box inside a chip cut with `margin` on each side: the central 1/(1+2*margin)."""
    fx, fy = w * margin / (1 + 2 * margin), h * margin / (1 + 2 * margin)
    return int(round(fx)), int(round(fy)), max(int(round(w - fx)), int(round(fx)) + 1), max(
        int(round(h - fy)), int(round(fy)) + 1)


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    n, lab, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].tolist()
    return lab, areas


def _core(h: int, w: int, cfg: MaskConfig, frac: float) -> np.ndarray:
    """Ellipse centred in the animal box with semi-axes `frac` x the box: chips are centred on the
    animal, so its centre is foreground even for thin, rotated bodies."""
    x0, y0, x1, y1 = central_box(h, w, cfg.margin)
    m = np.zeros((h, w), np.uint8)
    axes = (max(1, round((x1 - x0) * frac)), max(1, round((y1 - y0) * frac)))
    cv2.ellipse(m, ((x0 + x1) // 2, (y0 + y1) // 2), axes, 0, 0, 360, 1, -1)
    return m


def _frame(h: int, w: int, cfg: MaskConfig) -> tuple[int, int, int, int]:
    """The central box grown by `box_pad` px, clipped to the chip: where the animal can be."""
    x0, y0, x1, y1 = central_box(h, w, cfg.margin)
    p = cfg.box_pad
    return max(x0 - p, 0), max(y0 - p, 0), min(x1 + p, w), min(y1 + p, h)


def implied_box_iou(m: np.ndarray, cfg: MaskConfig) -> float:
    """IoU of the mask's tight box with the box the chip implies: centred on the central box, its
    longer side spanning it. The smallest such box covering the mask is compared, so an off-centre
    mask (leak to one side) or one far shorter than the box (a fragment) scores low."""
    h, w = m.shape
    x0, y0, x1, y1 = central_box(h, w, cfg.margin)
    ys, xs = np.nonzero(m)
    mx0, my0, mx1, my1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    cx, cy, sx, sy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    hx, hy = max(cx - mx0, mx1 - cx), max(cy - my0, my1 - cy)
    if hx / sx >= hy / sy:
        hx = max(hx, sx)
    else:
        hy = max(hy, sy)
    return float((mx1 - mx0) * (my1 - my0) / (4 * hx * hy))


def check_mask(mask: np.ndarray, cfg: MaskConfig) -> tuple[np.ndarray | None, str | None]:
    """Trim to the padded central box, keep the component on the chip centre (holes filled), and
    return (mask, None), or (None, reason) when the mask cannot be the chip's animal."""
    h, w = mask.shape
    fx0, fy0, fx1, fy1 = _frame(h, w, cfg)
    trimmed = np.zeros((h, w), np.uint8)
    trimmed[fy0:fy1, fx0:fx1] = mask[fy0:fy1, fx0:fx1] > 0
    lab, areas = _components(trimmed)
    if not areas:
        return None, "empty mask"
    core = _core(h, w, cfg, 0.15) > 0
    hits = np.bincount(lab[core], minlength=len(areas) + 1)[1:]
    if not hits.any():
        return None, "mask misses the chip centre"
    keep = int(np.argmax(hits))
    others = [a for i, a in enumerate(areas) if i != keep]
    if others and max(others) >= cfg.max_second_blob * areas[keep]:
        return None, f"several blobs (2nd = {max(others) / areas[keep]:.2f} x the central one)"
    m = (lab == keep + 1).astype(np.uint8)
    # fill holes: flood the background from the border, whatever it does not reach is inside
    inv = np.pad(1 - m, 1, constant_values=1)
    cv2.floodFill(inv, None, (0, 0), 2)
    m = np.where(inv[1:-1, 1:-1] == 2, 0, 1).astype(np.uint8)
    x0, y0, x1, y1 = central_box(h, w, cfg.margin)
    frac = m.sum() / float((x1 - x0) * (y1 - y0))
    if frac < cfg.min_area:
        return None, f"mask too small ({frac:.2f} of the box)"
    if frac > cfg.max_area:
        return None, f"mask too large ({frac:.2f} of the box)"
    # an animal ends inside its box; a mask lying along a side of the frame over a good part of its
    # extent was cut there: the animal is cut off (tile edge, padding) or background leaked in
    ys, xs = np.nonzero(m)
    ex, ey = np.ptp(xs) + 1, np.ptp(ys) + 1
    contact = (m[:, fx0].sum() / ey, m[:, fx1 - 1].sum() / ey, m[fy0].sum() / ex, m[fy1 - 1].sum() / ex)
    touched = sum(c > cfg.edge_contact for c in contact)
    if touched == 4:
        return None, "mask presses against all four edges of the central box"
    if touched > cfg.max_edges_touched:
        return None, (f"mask presses against {touched} edge(s) of the central box: the animal is cut off "
                      "or background leaked in")
    iou = implied_box_iou(m, cfg)
    if iou < cfg.min_box_iou:
        return None, f"mask box disagrees with the chip's box (IoU {iou:.2f})"
    return m * 255, None


def _grabcut(rgb: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """GrabCut initialised from a mask: outside the padded central box sure background (the animal's
    box is the central box, and a firm surround stops leaks into ice or water of the animal's
    colour), inside probably foreground, a small centre core surely foreground."""
    h, w = rgb.shape[:2]
    fx0, fy0, fx1, fy1 = _frame(h, w, cfg)
    gc = np.full((h, w), cv2.GC_BGD, np.uint8)
    gc[max(fy0, 1):min(fy1, h - 1), max(fx0, 1):min(fx1, w - 1)] = cv2.GC_PR_FGD
    gc[_core(h, w, cfg, cfg.fg_core) > 0] = cv2.GC_FGD
    img = cv2.medianBlur(rgb, cfg.denoise) if cfg.denoise else rgb
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means init draws from OpenCV's global RNG: same mask in any process
    cv2.grabCut(np.ascontiguousarray(img[..., ::-1]), gc, None, bgd, fgd, cfg.grabcut_iters,
                cv2.GC_INIT_WITH_MASK)
    return np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)


def _border_distance(rgb: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Cheap fallback: Lab distance to the median border colour, Otsu-thresholded, inside the box."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    d = np.linalg.norm(lab - np.median(border, axis=0), axis=2)
    d8 = cv2.normalize(d, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, m = cv2.threshold(cv2.GaussianBlur(d8, (3, 3), 0), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def estimate_mask(rgb: np.ndarray, cfg: MaskConfig | None = None) -> MaskResult:
    """GrabCut seeded from the central box; if it fails or looks implausible, the colour fallback."""
    cfg = cfg or MaskConfig()
    h, w = rgb.shape[:2]
    s = min(1.0, cfg.max_side / max(h, w))
    small = cv2.resize(rgb, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA) \
        if s < 1 else rgb
    reasons = []
    for method, fn in (("grabcut", _grabcut), ("border-color", _border_distance)):
        try:
            raw = fn(small, cfg)
        except cv2.error as e:
            reasons.append(f"{method}: {e.err}")
            continue
        m, reason = check_mask(raw, cfg)
        if m is not None:
            if s < 1:
                m = (cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) > 127).astype(np.uint8) * 255
            return MaskResult(m, method)
        reasons.append(f"{method}: {reason}")
    return MaskResult(None, "rejected", "; ".join(reasons))


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def compute_mask_cached(chip: Path, cache: Path, cfg: MaskConfig) -> dict:
    """Mask for one chip, cached as `<cache>/<key>.png` + a JSON record (so reruns skip the work);
    the record says whether the chip was accepted and why not."""
    key = _key(chip)
    rec_path = cache / f"{key}.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    rgb = np.asarray(Image.open(chip).convert("RGB"))
    res = estimate_mask(rgb, cfg)
    rec = {"chip": str(chip), "key": key, "method": res.method, "reason": res.reason, "mask": None}
    if res.mask is not None:
        mpath = cache / f"{key}.png"
        atomic_save_image(Image.fromarray(res.mask), mpath)
        rec["mask"] = str(mpath)
    write_json(rec_path, rec)
    return rec

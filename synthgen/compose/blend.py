"""Instance geometry and blending. Everything works on the paste's local crop, not the whole tile
(speed), and every mode returns the alpha it actually pasted: the label comes from that alpha."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

from synthgen.compose.config import BlendConfig, TileAugConfig

# IJG standard luminance quantisation table (quality 50), in the zig-zag-free row order PIL reports.
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], float)


def _zigzag_order() -> np.ndarray:
    idx = sorted(((i, j) for i in range(8) for j in range(8)),
                 key=lambda p: (p[0] + p[1], p[1] if (p[0] + p[1]) % 2 == 0 else p[0]))
    return np.array([i * 8 + j for i, j in idx])


def _quality_tables() -> np.ndarray:
    """(2 orders x 100 qualities x 64) IJG-scaled luminance tables, for matching a file's table."""
    q = np.arange(1, 101, dtype=float)
    scale = np.where(q < 50, 5000 / q, 200 - 2 * q)[:, None]
    return np.stack([np.clip(np.floor((std * scale + 50) / 100), 1, 255)
                     for std in (_STD_LUMA, _STD_LUMA[_zigzag_order()])])


_TABLES = _quality_tables()


def estimate_jpeg_quality(img: Image.Image, default: int = 90) -> int:
    """Quality whose IJG-scaled luminance table best matches the file's (PIL quantisation tables);
    `default` for non-JPEG sources."""
    q = getattr(img, "quantization", None)
    if not q or 0 not in q or len(q[0]) != 64:
        return default
    err = np.abs(_TABLES - np.array(list(q[0]), float)).mean(axis=2)  # (orders, qualities)
    return int(np.unravel_index(np.argmin(err), err.shape)[1]) + 1


def transform_instance(rgb: np.ndarray, alpha: np.ndarray, scale: float, angle: float, hflip: bool,
                       vflip: bool, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale, flip and rotate (degrees, counter-clockwise) an RGB chip and its alpha (float 0..1) onto
    a canvas just large enough, cropped to the alpha plus `pad` pixels."""
    if hflip:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    if vflip:
        rgb, alpha = rgb[::-1], alpha[::-1]
    # crop to the mask first: the chip's background never needs warping
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
    rgb, alpha = rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1]
    h, w = alpha.shape
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ow = int(math.ceil((abs(w * c) + abs(h * s)) * scale)) + 2 * pad + 2
    oh = int(math.ceil((abs(w * s) + abs(h * c)) * scale)) + 2 * pad + 2
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[0, 2] += ow / 2 - w / 2
    m[1, 2] += oh / 2 - h / 2
    interp = cv2.INTER_AREA if scale < 0.7 and angle % 90 == 0 else cv2.INTER_LINEAR
    out_rgb = cv2.warpAffine(np.ascontiguousarray(rgb), m, (ow, oh), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    out_a = cv2.warpAffine(np.ascontiguousarray(alpha, dtype=np.float32), m, (ow, oh), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    ys, xs = np.nonzero(out_a > 0.5)
    if not len(ys):
        return out_rgb[:0, :0], out_a[:0, :0]
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, oh)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, ow)
    return out_rgb[y0:y1, x0:x1], out_a[y0:y1, x0:x1]


def blend_alpha(alpha: np.ndarray, mode: str, cfg: BlendConfig) -> np.ndarray:
    """The alpha a blend mode pastes: hard (binary), feathered (distance transform ramp inside the
    edge), Gaussian-blurred, or binary for Poisson (seamlessClone takes a binary mask)."""
    hard = (alpha > 0.5).astype(np.float32)
    if mode in ("hard", "poisson"):
        return hard
    if mode == "feather":
        r = max(cfg.feather_px, 1e-3)
        # +0.5 keeps the 0.5 iso-line one half ramp inside the edge, so tiny instances survive
        d = cv2.distanceTransform(hard.astype(np.uint8), cv2.DIST_L2, 3)
        return np.clip((d + 0.5) / r, 0, 1) * hard
    if mode == "gaussian":
        return cv2.GaussianBlur(hard, (0, 0), max(cfg.gaussian_sigma, 1e-3))
    raise ValueError(f"unknown blend mode {mode!r}")


def match_color(fg: np.ndarray, fg_mask: np.ndarray, bg: np.ndarray, bg_mask: np.ndarray,
                strength: float) -> np.ndarray:
    """Move the instance's Lab mean/std part of the way (`strength`) to the local background's, so a
    chip shot in other light sits in this tile; partial, or a dark seal on white ice would vanish."""
    if strength <= 0 or fg_mask.sum() < 4 or bg_mask.sum() < 4:
        return fg
    lf = cv2.cvtColor(fg, cv2.COLOR_RGB2LAB)
    mf, sf = (v.ravel() for v in cv2.meanStdDev(lf, mask=fg_mask.astype(np.uint8)))
    mb, sb = (v.ravel() for v in cv2.meanStdDev(cv2.cvtColor(bg, cv2.COLOR_RGB2LAB), mask=bg_mask.astype(np.uint8)))
    ratio = np.clip((sb + 1e-3) / (sf + 1e-3), 0.5, 2.0) ** strength
    tgt_mean = mf + strength * (mb - mf)
    # per-channel affine map as a lookup table: cheaper than float maths over the crop
    lut = np.clip((np.arange(256)[:, None] - mf) * ratio + tgt_mean, 0, 255).astype(np.uint8)
    out = np.stack([lut[lf[..., c], c] for c in range(3)], axis=-1)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


def paste(tile: np.ndarray, fg: np.ndarray, alpha: np.ndarray, x: int, y: int, mode: str, cfg: BlendConfig,
          rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Paste `fg` with `alpha` (patch coordinates) at (x, y) into `tile` in place; returns the alpha
    that was pasted (patch size), from which the caller takes the label, and the mode really used."""
    ph, pw = alpha.shape
    region = tile[y:y + ph, x:x + pw]
    a = blend_alpha(alpha, mode, cfg)
    fg = match_color(fg, alpha > 0.5, region, alpha <= 0.05, cfg.color_match)
    if cfg.shadow_p > 0 and rng.random() < cfg.shadow_p:
        _shadow(tile, a, x, y, cfg, rng)
    if mode == "poisson":
        m = (a > 0.5).astype(np.uint8) * 255
        th, tw = tile.shape[:2]
        if x > 1 and y > 1 and x + pw < tw - 1 and y + ph < th - 1 and m.any():
            ys, xs = np.nonzero(m)
            # seamlessClone centres the mask's bounding box at `center`
            cx = x + (xs.min() + xs.max() + 1) // 2
            cy = y + (ys.min() + ys.max() + 1) // 2
            try:
                bgr = cv2.seamlessClone(np.ascontiguousarray(fg[..., ::-1]), np.ascontiguousarray(tile[..., ::-1]),
                                        m, (int(cx), int(cy)), cv2.NORMAL_CLONE)
                cloned = bgr[y:y + ph, x:x + pw, ::-1]
                # seamlessClone can wash an instance into the background; then the label would sit on
                # nothing, so keep the clone only if the instance kept most of its own look
                shift = np.abs(cloned.astype(np.int16) - fg.astype(np.int16))[m > 0].mean()
                if shift <= cfg.poisson_max_shift:
                    tile[y:y + ph, x:x + pw] = np.where(m[..., None] > 0, cloned, region)
                    return a, mode
            except cv2.error:
                pass
        a = blend_alpha(alpha, "feather", cfg)  # Poisson impossible or too destructive: feather instead
        mode = "feather (poisson fallback)"
    af = a[..., None]
    region[:] = (fg.astype(np.float32) * af + region.astype(np.float32) * (1 - af) + 0.5).astype(np.uint8)
    return a, mode


def _shadow(tile: np.ndarray, a: np.ndarray, x: int, y: int, cfg: BlendConfig, rng: np.random.Generator) -> None:
    """Darken the background under a blurred, offset copy of the alpha (soft cast shadow), on a
    window grown by offset + 3 sigma so the shadow is never cut off at the patch edge."""
    h, w = a.shape
    off = cfg.shadow_offset * max(h, w)
    sigma = max(off / 2, 1.0)
    m = int(math.ceil(off + 3 * sigma))
    th, tw = tile.shape[:2]
    x0, y0, x1, y1 = max(x - m, 0), max(y - m, 0), min(x + w + m, tw), min(y + h + m, th)
    canvas = np.zeros((y1 - y0, x1 - x0), np.float32)
    canvas[y - y0:y - y0 + h, x - x0:x - x0 + w] = a
    ang = rng.uniform(0, 2 * math.pi)
    shift = np.float32([[1, 0, off * math.cos(ang)], [0, 1, off * math.sin(ang)]])
    sh = cv2.GaussianBlur(cv2.warpAffine(canvas, shift, canvas.shape[::-1], borderValue=0), (0, 0), sigma)
    win = tile[y0:y1, x0:x1]
    win[:] = (win.astype(np.float32) * (1 - cfg.shadow_opacity * sh[..., None]) + 0.5).astype(np.uint8)


def build_tile_aug(cfg: TileAugConfig):
    """Albumentations photometric + noise pipeline for whole tiles (None when disabled)."""
    if cfg.p <= 0:
        return None
    import albumentations as A

    return A.Compose([
        A.RandomBrightnessContrast(cfg.brightness, cfg.contrast, p=cfg.p),
        A.GaussNoise(std_range=(0.01, 0.04), p=cfg.noise_p),  # ISONoise costs ~80 ms a tile
    ])


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    """Encode as JPEG (the re-compression that makes pastes carry the same artefacts as the tile)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()

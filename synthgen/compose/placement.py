"""Where a paste may go: background pixels (no overlap with real labels or other pastes beyond an
IoA threshold), optionally inside a habitat mask (colour rule, raster, or polygons)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from synthgen.compose.config import CountConfig, HabitatConfig
from synthgen.errors import SynthgenError


def sample_count(cfg: CountConfig, rng: np.random.Generator) -> int:
    n = rng.poisson(cfg.mean) if cfg.distribution == "poisson" else rng.integers(cfg.low, cfg.high + 1)
    return int(min(n, cfg.max))


def color_habitat(rgb: np.ndarray, cfg: HabitatConfig) -> np.ndarray:
    """Pixels whose Lab lightness/chroma fit the rule (e.g. bright, grey ice), cleaned morphologically."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    L = lab[..., 0] * (100.0 / 255.0)
    chroma = np.hypot(lab[..., 1] - 128, lab[..., 2] - 128)
    m = ((L >= cfg.l_min) & (L <= cfg.l_max) & (chroma <= cfg.chroma_max)).astype(np.uint8)
    k = np.ones((5, 5), np.uint8)
    return cv2.morphologyEx(cv2.morphologyEx(m, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)


def raster_habitat(cfg: HabitatConfig, image_path: str, shape: tuple[int, int], georef) -> np.ndarray:
    """Habitat from a raster: a folder of per-tile masks (`<stem>.png/.tif`, nonzero = habitat) or one
    georeferenced raster resampled onto the tile's grid."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    src_path = Path(cfg.path)
    if src_path.is_dir():
        for ext in (".png", ".tif", ".tiff", ".jpg"):
            p = src_path / (Path(image_path).stem + ext)
            if p.is_file():
                m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
                if m is None or m.shape != shape:
                    raise SynthgenError(f"{p}: habitat mask unreadable or not {shape[1]}x{shape[0]} like {image_path}")
                return (m > 0).astype(np.uint8)
        raise SynthgenError(f"{src_path}: no habitat mask named {Path(image_path).stem}.png/.tif")
    if georef is None:
        raise SynthgenError(f"{image_path}: a georeferenced habitat raster needs GeoTIFF backgrounds")
    out = np.zeros(shape, np.uint8)
    with rasterio.open(src_path) as src:
        if src.crs is None:
            raise SynthgenError(f"{src_path}: habitat raster has no CRS")
        reproject(rasterio.band(src, 1), out, dst_transform=georef[0], dst_crs=georef[1],
                  resampling=Resampling.nearest)
    return (out > 0).astype(np.uint8)


def vector_habitat(gdf, image_path: str, shape: tuple[int, int], georef) -> np.ndarray:
    """Habitat polygons: reprojected into the raster's CRS and burnt onto its grid, or (plain images)
    pixel polygons whose `image` column names the tile file."""
    from affine import Affine
    from rasterio.features import rasterize

    if georef is not None and gdf.crs is not None:
        geoms = gdf.to_crs(georef[1]).geometry
        transform = georef[0]
    else:
        if "image" not in gdf.columns:
            raise SynthgenError("habitat polygons without a CRS need an `image` column naming each tile (pixel "
                                "coordinates)")
        geoms = gdf[gdf["image"].astype(str) == Path(image_path).name].geometry
        transform = Affine.identity()
    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, np.uint8)
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=transform, fill=0, dtype="uint8")


def uniform_edge_region(rgb: np.ndarray, tol: float = 8.0, min_share: float = 0.6, max_depth: float = 0.12,
                        step: float = 30.0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the frame without uniform-colour bands along its edges (a camera's date
    banner, letterbox bars), which are not habitat. A band is the run of lines from an edge whose
    median colour stays within `tol` of the edge line's, with `min_share` of their pixels within
    3 x `tol` (the banner's text and its JPEG ringing are the minority), no deeper than `max_depth`
    of the side, and ending in a sharp step (the scene beyond differs by `step` levels): flat water
    or sky fades, and runs deeper."""
    img = rgb.astype(np.int16)
    h, w = img.shape[:2]

    def depth(lines: np.ndarray) -> int:  # lines from the edge inward, each (length, 3)
        ref = np.median(lines[0], axis=0)
        limit = int(max_depth * len(lines))
        for n, line in enumerate(lines[: limit + 1]):
            near = np.abs(line - ref).max(axis=1)
            if np.median(near) > tol or (near <= 3 * tol).mean() < min_share:
                beyond = lines[min(n + 2, len(lines) - 1)]  # past the JPEG ringing of the boundary
                return n if np.median(np.abs(beyond - ref).max(axis=1)) >= step else 0  # a fade is scene
        return 0  # uniform deeper than any border: the scene itself (dark water, sky), not a band

    top, bottom = depth(img), depth(img[::-1])
    left, right = depth(img.transpose(1, 0, 2)), depth(img.transpose(1, 0, 2)[::-1])
    return left, top, w - right, h - bottom


def ioa(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area, for each of `others` (N, 4) xyxy."""
    if not len(others):
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return ix * iy / np.maximum(np.minimum(a, b), 1e-9)


def find_position(alpha: np.ndarray, box: tuple[int, int, int, int], tile_hw: tuple[int, int],
                  occupied: np.ndarray, habitat: np.ndarray | None, max_overlap: float, min_fraction: float,
                  tries: int, rng: np.random.Generator,
                  region: tuple[int, int, int, int] | None = None) -> tuple[int, int] | None:
    """Top-left (x, y) for an instance patch whose alpha's tight box is `box` (patch coordinates), or
    None when no free spot was found in `tries` draws. Habitat draws start from habitat pixels. The
    tight box stays inside `region` (x0, y0, x1, y1; default the tile)."""
    ph, pw = alpha.shape
    th, tw = tile_hw
    if ph > th or pw > tw:
        return None
    bx0, by0, bx1, by1 = box
    rx0, ry0, rx1, ry1 = region or (0, 0, tw, th)
    xlo, xhi = max(0, rx0 - bx0), min(tw - pw, rx1 - bx1)  # patch origins keeping the box in the region
    ylo, yhi = max(0, ry0 - by0), min(th - ph, ry1 - by1)
    if xhi < xlo or yhi < ylo:
        return None
    fg = alpha > 0.5
    n_fg = max(int(fg.sum()), 1)
    hab_pts = np.argwhere(habitat > 0) if habitat is not None else None
    if hab_pts is not None and not len(hab_pts):
        return None
    for _ in range(tries):
        if hab_pts is not None:
            cy, cx = hab_pts[rng.integers(len(hab_pts))]
            x, y = int(cx - (bx0 + bx1) // 2), int(cy - (by0 + by1) // 2)
            x, y = int(np.clip(x, xlo, xhi)), int(np.clip(y, ylo, yhi))
        else:
            x, y = int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1))
        b = np.array([x + bx0, y + by0, x + bx1, y + by1], float)
        if len(occupied) and ioa(b, occupied).max() > max_overlap:
            continue
        if habitat is not None:
            inside = habitat[y:y + ph, x:x + pw][fg].sum() / n_fg
            if inside < min_fraction:
                continue
        return x, y
    return None

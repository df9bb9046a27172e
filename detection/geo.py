"""Pixel <-> map conversion of boxes over a georeferenced raster.

One place for the affine maths that dataset I/O, the compositor and sliced inference share:
pixel boxes become map polygons with the raster's transform, map geometries become pixel boxes
with its inverse (reprojecting first when the vector CRS differs from the raster's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detection.errors import DataError


@dataclass(frozen=True)
class Georef:
    """A raster's pixel grid: affine transform (rasterio `Affine`), CRS, and size in pixels."""

    path: str
    transform: object
    crs: object
    width: int
    height: int


def read_georef(path: str | Path) -> Georef:
    """Transform and CRS of a raster (header only); a raster without CRS is a DataError naming it."""
    geo = find_georef(path)
    if geo is None:
        raise DataError(f"{path}: raster has no CRS, so map coordinates cannot be placed on it", file=path)
    return geo


def find_georef(path: str | Path) -> Georef | None:
    """Like `read_georef`, but None for an image without CRS (a plain PNG/JPG): vector boxes over it
    can only be in pixel coordinates, which the caller decides."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                crs, transform, w, h = src.crs, src.transform, src.width, src.height
    except RasterioIOError as e:
        raise DataError(f"{path}: cannot read raster ({e})", file=path) from e
    if crs is None:
        return None
    if transform.is_identity:
        raise DataError(f"{path}: raster has no geotransform (identity affine)", file=path)
    return Georef(str(Path(path).resolve()), transform, crs, w, h)


def pixel_to_map_boxes(boxes_xyxy: np.ndarray, transform) -> list:
    """Pixel boxes (N, 4) xyxy -> shapely polygons in map coordinates (all four corners mapped,
    so rotated or sheared grids stay exact)."""
    from shapely.geometry import Polygon

    b = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    xs = np.stack([b[:, 0], b[:, 2], b[:, 2], b[:, 0]], axis=1)
    ys = np.stack([b[:, 1], b[:, 1], b[:, 3], b[:, 3]], axis=1)
    a, bb, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f)
    mx, my = a * xs + bb * ys + c, d * xs + e * ys + f
    return [Polygon(list(zip(mx[i], my[i], strict=True))) for i in range(len(b))]


def map_to_pixel_boxes(geometries, transform) -> np.ndarray:
    """Map geometries -> (N, 4) pixel xyxy: the min/max of every vertex under the inverse transform."""
    import shapely

    inv = ~transform
    out = np.zeros((len(geometries), 4), dtype=float)
    for i, g in enumerate(geometries):
        xy = shapely.get_coordinates(g)
        px = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c
        py = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
        out[i] = (px.min(), py.min(), px.max(), py.max())
    return out

"""Training windows for the in-context generator: a real tile crop, the hole the animal fills, and
which pixels are real (not padding).

Why windows and not chips: the tile already holds the scene (ice, water, light), so the model only
has to draw the animal into it; a window keeps the animal at the tile's own scale (a fixed native
side on nadir views) and its surroundings exact. Windows are placed so the instance lies whole inside
and, wherever the tile allows, the window lies whole inside the tile (no padding to learn); where it
cannot, the padded pixels are marked so the loss leaves them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from detection.dataset import group_ids
from synthgen.augment import flip_rotate
from synthgen.errors import SynthgenError


class WindowConfig(BaseModel):
    """How training windows are cut from the tiles (stored with the model: painting cuts the same)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(48, ge=16, description="window side in model pixels")
    native: int | None = Field(
        None, ge=8, description="window side in tile pixels (nadir views: one scale for all); None: per instance")
    context: float = Field(1.6, ge=1.0, description="the window is at least this times the instance's longest side")
    margin: float = Field(0.15, ge=0.0, le=1.0, description="the hole is the instance region grown by this fraction")
    jitters: int = Field(4, ge=1, description="windows per instance, at seeded offsets")
    group_pattern: str | None = Field(
        r"^(.+?)_jpg\.rf\.", description="images whose names share this group are copies: one is used (case-insensitive)")
    seed: int = 0

    def native_side(self, long_side: float) -> int:
        return max(self.native or 0, math.ceil(self.context * long_side))


def corners_of(box) -> np.ndarray:
    """The instance's four corners in tile pixels: the oriented box where the data has one."""
    obb = getattr(box, "obb", None)
    if isinstance(obb, tuple | list) and len(obb) == 8:
        return np.asarray(obb, dtype=np.float64).reshape(4, 2)
    return np.array([[box.xmin, box.ymin], [box.xmax, box.ymin], [box.xmax, box.ymax], [box.xmin, box.ymax]], float)


def grow(corners: np.ndarray, margin: float) -> np.ndarray:
    """The quadrilateral scaled about its centre by 1 + 2 * margin (both of its own axes)."""
    c = corners.mean(0)
    return c + (corners - c) * (1 + 2 * margin)


def hole_mask(corners: np.ndarray, origin: tuple[float, float], native: int, size: int) -> np.ndarray:
    """uint8 {0,1} size x size mask of the polygon `corners` (tile pixels) in the window at `origin`."""
    import cv2

    scale = size / native
    pts = ((corners - np.asarray(origin)) * scale).round().astype(np.int32)
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [pts], 1)
    return m


def cut_window(image: np.ndarray, origin: tuple[int, int], native: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 size x size, real-pixel mask uint8 {0,1}) of the native square at `origin`;
    pixels outside the tile are edge-replicated and marked 0."""
    import cv2

    h, w = image.shape[:2]
    x0, y0 = origin
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + native, w), min(y0 + native, h)
    crop = image[cy0:cy1, cx0:cx1]
    pads = (cy0 - y0, y0 + native - cy1, cx0 - x0, x0 + native - cx1)
    valid = np.ones(crop.shape[:2], np.uint8)
    if any(pads):
        crop = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_REPLICATE)
        valid = cv2.copyMakeBorder(valid, *pads, cv2.BORDER_CONSTANT, value=0)
    interp = cv2.INTER_AREA if native > size else cv2.INTER_CUBIC
    rgb = cv2.resize(crop, (size, size), interpolation=interp)
    valid = (cv2.resize(valid.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.999).astype(np.uint8)
    return rgb, valid


def place_window(corners: np.ndarray, native: int, tile_wh: tuple[int, int], rng: np.random.Generator
                 ) -> tuple[int, int]:
    """A window origin holding the whole instance and, where the tile allows, lying inside the tile."""
    w, h = tile_wh
    lo, hi = corners.min(0).clip(0, None), np.minimum(corners.max(0), (w, h))  # the part inside the tile
    origin = []
    for axis, extent in ((0, w), (1, h)):
        a = math.ceil(hi[axis]) - native  # the instance's far edge at the window's far edge
        b = math.floor(lo[axis])
        a, b = max(a, 0), min(b, extent - native)
        if a > b:  # no place satisfies both: centre it (padding is marked)
            origin.append(round((lo[axis] + hi[axis]) / 2 - native / 2))
        else:
            origin.append(int(rng.integers(a, b + 1)))
    return origin[0], origin[1]


def one_per_group(paths: list[str], pattern: str | None) -> list[str]:
    """The first image (sorted) of each source group: augmented copies of one tile count once."""
    keep: dict[str, str] = {}
    for p, g in zip(sorted(paths), group_ids(sorted(paths), pattern), strict=True):
        keep.setdefault(g, p)
    return list(keep.values())


def on_tile(poly: np.ndarray, tile_wh: tuple[int, int]) -> bool:
    """Whether every corner of `poly` (tile px) lies on the tile."""
    return bool(poly.min() >= 0 and poly[:, 0].max() <= tile_wh[0] and poly[:, 1].max() <= tile_wh[1])


@dataclass
class WindowSet:
    """Training windows in memory (uint8): images [N,3,S,S], holes [N,1,S,S], valid [N,1,S,S]."""

    images: torch.Tensor
    holes: torch.Tensor
    valid: torch.Tensor
    lineages: list[dict[str, str]]
    taxa: list[str]
    labels: list[str]
    root: Path
    sources: int  # distinct source tiles used
    shapes: dict[str, list[list[float]]]  # per label, [long, short] sides in tile px (painted sizes)
    context_channels: int = 4  # masked window (3) + hole (1)

    def batch(self, idx: torch.Tensor, g: torch.Generator, dihedral: bool, hflip: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 in [-1, 1], context = masked window + hole, loss weight = real pixels) for `idx`,
        each sample under one of the eight flips/rotations (nadir views) or a horizontal flip."""
        x0 = self.images[idx].float().div(127.5).sub(1.0)
        hole = self.holes[idx].float()
        valid = self.valid[idx].float()
        stack = flip_rotate(torch.cat([x0, hole, valid], 1), g, dihedral, hflip)
        x0, hole, valid = stack[:, :3], stack[:, 3:4], stack[:, 4:5]
        return x0, context_of(x0, hole), valid


def context_of(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The model's extra input: the window with the hole zeroed, and the hole itself."""
    return torch.cat([x * (1 - hole), hole], 1)


def load_windows(data: str | Path, taxonomy: str | Path | None, cfg: WindowConfig, split: str | None = "train",
                 progress: bool = True) -> WindowSet:
    """Cut `cfg.jitters` windows around every instance of `split` (one image per source group)."""
    import cv2
    from tqdm.auto import tqdm

    from detection import read_dataset

    ds = read_dataset(data)
    if split is not None:
        if split not in ds.splits:
            raise SynthgenError(f"{data}: no split {split!r} (has {', '.join(ds.splits)})")
        ds = ds.subset(split)
    keep = one_per_group(list(ds.images.image_path), cfg.group_pattern)
    ds = ds.subset(images=keep)
    if ds.boxes.empty:
        raise SynthgenError(f"{data}: no labelled instances in split {split!r}")
    lineage_of: dict[str, tuple[str, dict[str, str]]] = {}
    if taxonomy is not None:
        from taxonomy import Taxonomy

        tax = Taxonomy.load(taxonomy)
        for lab in sorted(set(ds.boxes.label)):
            t = tax.labels.get(lab) or tax.resolve(lab)
            lineage_of[lab] = (t.name, {a.level: a.name for a in tax.lineage(t)})
    rng = np.random.default_rng(cfg.seed)
    imgs, holes, valids, lineages, taxa, labels = [], [], [], [], [], []
    by_image = ds.boxes.groupby("image_path", sort=True)
    for path, boxes in tqdm(by_image, total=by_image.ngroups, desc="windows", unit="tile", disable=not progress):
        tile = cv2.imread(path, cv2.IMREAD_COLOR)
        if tile is None:
            raise SynthgenError(f"{path}: cannot decode image")
        tile = cv2.cvtColor(tile, cv2.COLOR_BGR2RGB)
        h, w = tile.shape[:2]
        for b in boxes.itertuples():
            corners = corners_of(b)
            span = corners.max(0) - corners.min(0)
            native = cfg.native_side(float(span.max()))
            hole_poly = grow(corners, cfg.margin)
            for _ in range(cfg.jitters):
                origin = place_window(hole_poly, native, (w, h), rng)
                rgb, valid = cut_window(tile, origin, native, cfg.size)
                imgs.append(rgb)
                valids.append(valid)
                holes.append(hole_mask(hole_poly, origin, native, cfg.size))
                taxon, lineage = lineage_of.get(b.label, (b.label, {"taxon": b.label}))
                lineages.append(lineage)
                taxa.append(taxon)
                labels.append(b.label)
    return WindowSet(
        images=torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
        holes=torch.from_numpy(np.stack(holes))[:, None].contiguous(),
        valid=torch.from_numpy(np.stack(valids))[:, None].contiguous(),
        lineages=lineages, taxa=taxa, labels=labels, root=Path(data), sources=len(keep),
        shapes=instance_shapes(ds.boxes, seed=cfg.seed),
    )


def instance_shapes(boxes, limit: int = 2000, seed: int = 0) -> dict[str, list[list[float]]]:
    """Per label, [long side, short side] in tile px of labelled instances (oriented boxes where given),
    a seeded sample of at most `limit`: what painted animals' sizes are drawn from."""
    out: dict[str, list[list[float]]] = {}
    for b in boxes.itertuples():
        c = corners_of(b)
        a, s = float(np.linalg.norm(c[1] - c[0])), float(np.linalg.norm(c[2] - c[1]))
        out.setdefault(b.label, []).append([round(max(a, s), 2), round(min(a, s), 2)])
    rng = np.random.default_rng(seed)
    return {k: [v[i] for i in sorted(rng.choice(len(v), min(limit, len(v)), replace=False))] for k, v in out.items()}

"""The canonical detection table and the format readers/writers around it.

Every format (YOLO detect/OBB + data.yaml, COCO JSON, Pascal VOC XML, DeepForest CSV, vector boxes
over a GeoTIFF) reads into one `DetectionDataset` and writes back out of it, so the rest of the
pipeline never sees a format. Image sizes come from file headers (fast); full decoding only with
`verify=True`. Bad input raises `DataError` naming the file and line, or with `on_error="skip"`
the offending image is left out and listed in `ds.problems` (a zero-size box drops only that box).
Every number read from a label must be finite. Inputs are only ever read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml

from detection.errors import DataError
from detection.geo import find_georef, map_to_pixel_boxes, pixel_to_map_boxes, read_georef
from synthgen.io_utils import atomic_write, write_json

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VECTOR_EXT = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile"}
IMAGE_COLUMNS = ["image_path", "width", "height", "split", "source"]
BOX_COLUMNS = ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "taxon", "obb", "geometry", "source",
               "split"]
DETECT_TOL = 0.02  # normalised coordinates may overshoot [0, 1] by this much (rounding in exporters)
OBB_TOL = 0.1  # rotated corners of edge objects legitimately fall outside the image (seals: -0.045..1.042)
SPLIT_ALIASES = {"valid": "val", "validation": "val"}
OnError = Literal["raise", "skip"]
Format = Literal["yolo", "yolo-obb", "coco", "voc", "csv", "vector"]
PixelY = Literal["auto", "down", "up"]
TIFF_EXT = (".tif", ".tiff")
GREY = 128  # what libjpeg fills in for every block it finds no data for


@dataclass
class DetectionDataset:
    """Images and boxes as two DataFrames (columns in IMAGE_COLUMNS / BOX_COLUMNS), class names in
    id order, the inputs skipped with on_error="skip" (dicts: file, line, reason), and notes on how
    the input was read that a user should see (e.g. vector boxes taken as pixel coordinates)."""

    images: pd.DataFrame
    boxes: pd.DataFrame
    names: list[str]
    problems: list[dict] = field(default_factory=list)
    root: str | None = None
    fmt: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "val": 1, "test": 2}
        return sorted(self.images.split.unique(), key=lambda s: (order.get(s, 3), s))

    def subset(self, split: str | None = None, images: list[str] | None = None) -> DetectionDataset:
        """A copy restricted to one split and/or a list of image paths (tests, chips, benchmarks)."""
        im = self.images if split is None else self.images[self.images.split == split]
        if images is not None:
            im = im[im.image_path.isin(set(images))]
        keep = set(im.image_path)
        bx = self.boxes[self.boxes.image_path.isin(keep)]
        return DetectionDataset(im.reset_index(drop=True), bx.reset_index(drop=True), list(self.names),
                                list(self.problems), self.root, self.fmt, list(self.notes))


class _Collector:
    """Raise on the first problem, or (skip mode) remember it and tell the caller to drop the item."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self.problems: list[dict] = []

    def fail(self, file: str | Path, line: int | None, reason: str) -> None:
        where = f"{file}:{line}" if line else str(file)
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}", file=file, line=line, reason=reason)
        self.problems.append({"file": str(file), "line": line, "reason": reason})


def group_ids(image_paths: Sequence[str], pattern: str | None) -> list[str]:
    """Source group per image: the regex's first group on the file name, matched case-insensitively
    and lower-cased (Roboflow writes both `_jpg.rf.` and `_JPG.rf.`), else the file stem. Augmented
    copies of one source tile share a group."""
    rx = re.compile(pattern, re.IGNORECASE) if pattern else None
    out = []
    for p in image_paths:
        m = rx.search(Path(p).name) if rx else None
        out.append(m.group(1).lower() if m else Path(p).stem)
    return out


def canonical_split(s: str) -> str:
    """Roboflow's `valid` / `validation` are the `val` split (data.yaml keys are train/val/test)."""
    return SPLIT_ALIASES.get(s, s)


def open_image(path: str | Path, load: bool = False):
    """The PIL image, every pixel decoded and checked against the header when `load`; Pillow's
    failures (unreadable, truncated, over its pixel limit) become one DataError naming the file.

    Pillow's pixel-limit warning is silenced: the limit itself is an error here, and below it a
    header that claims more pixels than the file holds is caught by `_check_pixels`."""
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            try:
                if load:
                    im.load()
            except BaseException:
                im.close()
                raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: image not found", file=path, reason="image not found") from e
    except Image.DecompressionBombError as e:
        reason = f"over Pillow's pixel limit, refused as a possible decompression bomb ({e})"
        raise DataError(f"{path}: {reason}", file=path, reason=reason) from e
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read image ({e})", file=path, reason=f"cannot read image ({e})") from e
    if load:
        try:
            _check_pixels(im, path)
        except DataError:
            im.close()
            raise
    return im


def _check_pixels(im, path: Path) -> None:
    """A JPEG whose header claims more pixels than its data holds decodes without error: libjpeg
    fills every missing block with uniform grey 128. A grey tail of at least a quarter of the height
    is that fill (a real photo is never exactly 128 there), so it is a DataError, not grey chips."""
    if im.format != "JPEG" or im.mode not in ("L", "RGB") or im.height < 32:
        return
    w, h = im.size
    tail = np.asarray(im.crop((0, h - h // 4, w, h)))
    if not (tail == GREY).all():
        return
    rows = (np.asarray(im.crop((0, 0, w, h - h // 4))) == GREY).reshape(h - h // 4, -1).all(axis=1)
    first = int(np.flatnonzero(~rows).max()) + 1 if (~rows).any() else 0
    reason = (f"header says {w}x{h} but the pixel data ends at row {first}: every row below is the decoder's "
              "uniform grey fill (header and pixels disagree)")
    raise DataError(f"{path}: {reason}", file=path, reason=reason)


def image_size(path: str | Path, verify: bool = False) -> tuple[int, int]:
    """(width, height) from the header, EXIF rotation applied; `verify` decodes every pixel."""
    path = Path(path)
    try:
        im = open_image(path, load=verify)
    except DataError:
        if path.suffix.lower() in TIFF_EXT and path.is_file() and not verify:
            return _raster_size(path)
        raise
    with im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _raster_size(path: Path) -> tuple[int, int]:
    """Size of a TIFF that PIL cannot open (e.g. 16-bit multiband GeoTIFFs) via rasterio."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as src:
            return src.width, src.height
    except RasterioIOError as e:
        raise DataError(f"{path}: cannot read image ({e})", file=path, reason="cannot read image") from e


def _frames(images: list[dict], boxes: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    im = pd.DataFrame(images, columns=IMAGE_COLUMNS)
    im = im.astype({"width": int, "height": int}) if len(im) else im
    bx = pd.DataFrame(boxes, columns=BOX_COLUMNS)
    bx = bx.astype({c: float for c in ("xmin", "ymin", "xmax", "ymax")}) if len(bx) else bx
    return im, bx


def _add_image(col: _Collector, images: list[dict], path: Path, split: str, source: str, verify: bool,
               size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """Append the image row; None (after recording a problem in skip mode) when it is unreadable."""
    try:
        w, h = image_size(path, verify) if size is None or verify else size
    except DataError as e:
        col.fail(path, None, e.reason)
        return None
    images.append({"image_path": str(path.resolve()), "width": w, "height": h, "split": split, "source": source})
    return w, h


def _box(img: Path, x0, y0, x1, y1, label, split, source, obb=None, geometry=None, taxon=None) -> dict:
    return {"image_path": str(img.resolve()), "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1, "label": label,
            "taxon": taxon, "obb": obb, "geometry": geometry, "source": source, "split": split}


# --- data.yaml ---------------------------------------------------------------------------------
@dataclass
class DataYaml:
    """An Ultralytics data.yaml: dataset root (`path`), split entries and class names in id order."""

    file: Path
    root: Path
    splits: dict[str, list[str]]
    names: list[str]

    def image_files(self, split: str) -> list[Path]:
        """Images of a split: each entry is a folder (searched recursively) or a .txt list of images."""
        files: list[Path] = []
        for entry in self.splits[split]:
            p = Path(entry) if Path(entry).is_absolute() else self.root / entry
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXT and f.is_file())
            elif p.is_file() and p.suffix == ".txt":
                for x in p.read_text(encoding="utf-8").splitlines():
                    x = x.strip()
                    if x:
                        q = Path(x)
                        files.append(q if q.is_absolute() else p.parent / q)
            elif p.is_file() and p.suffix.lower() in IMG_EXT:
                files.append(p)
            else:
                raise DataError(f"{self.file}: {split}: {entry!r} is not a folder, image list or image "
                                f"(looked at {p})", file=self.file)
        return files


def read_data_yaml(path: str | Path) -> DataYaml:
    """Parse data.yaml: `path` (relative to the file), train/val/test as str or list, names as dict or list."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not found", file=path) from e
    except yaml.YAMLError as e:
        line = e.problem_mark.line + 1 if getattr(e, "problem_mark", None) else None
        raise DataError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})", file=path, line=line) from e
    if not isinstance(d, dict) or "names" not in d:
        raise DataError(f"{path}: data.yaml needs a `names` mapping or list", file=path)
    names = d["names"]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: names keys must be integer class ids", file=path) from e
        if ids != list(range(len(ids))):
            raise DataError(f"{path}: names ids must be 0..{len(ids) - 1} without gaps, got {ids}", file=path)
        names = [str(names.get(i, names.get(str(i)))) for i in ids]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DataError(f"{path}: names must be a dict {{id: name}} or a list", file=path)
    if "nc" in d and int(d["nc"]) != len(names):
        raise DataError(f"{path}: nc={d['nc']} but {len(names)} names", file=path)
    root = Path(d.get("path") or ".")
    root = root if root.is_absolute() else (path.parent / root)
    splits = {}
    for key in ("train", "val", "test"):
        v = d.get(key)
        if v:
            splits[key] = [str(x) for x in v] if isinstance(v, list) else [str(v)]
    if not splits:
        raise DataError(f"{path}: no train/val/test entries", file=path)
    return DataYaml(path, root.resolve(), splits, names)


def save_data_yaml(path: str | Path, names: list[str], splits: dict[str, str | list[str]], root: str | Path = ".",
                   **extra) -> Path:
    """Write an Ultralytics data.yaml atomically, the one writer of the format: `path`, the split
    entries, names as an id -> name mapping, then `extra` keys (the synthetic-mix contract of
    `detection.train`: train_real, train_synthetic, synthetic_ratio, counts)."""
    d = {"path": str(root), **splits, "names": dict(enumerate(names)), **extra}
    with atomic_write(path) as f:
        yaml.safe_dump(d, f, sort_keys=False)
    return Path(path)


# --- YOLO ----------------------------------------------------------------------------------------
def yolo_line(cls: int | str, box, w: float, h: float) -> str:
    """One YOLO detect label line `cls cx cy bw bh` (normalised, 6 decimals), the pixel box
    (x0, y0, x1, y1) clipped to the w x h image first: a label describes what the image shows."""
    x0, y0, x1, y1 = (max(0.0, min(float(v), lim)) for v, lim in zip(box, (w, h, w, h), strict=True))
    return f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"


def polygon_line(cls: int | str, pts, w: float, h: float, clip: bool = True) -> str:
    """One YOLO polygon label line (OBB corners or a segment outline) from pixel points x1 y1 x2 y2 ..;
    `clip=False` keeps corners outside the image, where a rotated box of an edge animal lies."""
    xy = np.asarray(pts, float).reshape(-1, 2) / [w, h]
    return f"{cls} " + " ".join(f"{v:.6f}" for v in (np.clip(xy, 0, 1) if clip else xy).ravel())


def box_corners(box) -> list[float]:
    """The four corners x1 y1 .. x4 y4 of an axis-aligned pixel box, as a polygon label needs them."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_label_file(path: str | Path, lines: list[str]) -> Path:
    """A YOLO label file, one line each and newline-terminated (empty for an image without boxes)."""
    with atomic_write(path) as f:
        f.write("".join(ln + "\n" for ln in lines))
    return Path(path)


def label_path(image: Path) -> Path:
    """Ultralytics convention: the last /images/ in the path becomes /labels/, suffix .txt."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        head, tail = s.rsplit(sa, 1)
        return Path(head + sb + tail).with_suffix(".txt")
    return image.with_suffix(".txt")


def _sniff_obb(files: list[Path]) -> bool:
    """True when the first non-empty label line has 9 fields (YOLO-OBB), False for 5 (detect)."""
    for img in files:
        lab = label_path(img)
        if lab.is_file():
            for line in lab.read_text(encoding="utf-8-sig", errors="replace").splitlines():
                if line.split():
                    return len(line.split()) == 9
    return False


def _read_yolo(path: Path, col: _Collector, obb: bool | None, splits: list[str] | None,
               verify: bool) -> DetectionDataset:
    dy = read_data_yaml(path / "data.yaml" if path.is_dir() else path)
    images: list[dict] = []
    boxes: list[dict] = []
    names = dy.names
    files_by_split = {s: dy.image_files(s) for s in dy.splits if splits is None or s in splits}
    if obb is None:
        obb = _sniff_obb([f for fs in files_by_split.values() for f in fs])
    nf, tol = (9, OBB_TOL) if obb else (5, DETECT_TOL)
    form = "cls x1 y1 x2 y2 x3 y3 x4 y4" if obb else "cls cx cy w h"
    shared = _shared_label_files(files_by_split, col)
    for split, files in files_by_split.items():
        for img in files:
            lab = label_path(img)
            if lab in shared:
                continue
            rows = _parse_label_file(lab, col, names, nf, tol, form)
            if rows is None:
                continue
            size = _add_image(col, images, img, split, str(lab), verify)
            if size is None:
                continue
            w, h = size
            for ln, v in rows:
                if obb:
                    xs, ys = np.array(v[1::2]) * w, np.array(v[2::2]) * h
                    corners = tuple(float(c) for xy in zip(xs, ys, strict=True) for c in xy)
                    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
                else:
                    cx, cy, bw, bh = v[1] * w, v[2] * h, v[3] * w, v[4] * h
                    corners, (x0, y0, x1, y1) = None, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
                xyxy = _clip(col, lab, ln, (x0, y0, x1, y1), w, h)
                if xyxy:
                    boxes.append(_box(img, *xyxy, names[int(v[0])], split, f"{lab}:{ln}", obb=corners))
    im, bx = _frames(images, boxes)
    return DetectionDataset(im, bx, names, col.problems, str(dy.root), "yolo-obb" if obb else "yolo")


def _shared_label_files(files_by_split: dict[str, list[Path]], col: _Collector) -> set[Path]:
    """Label files that two different images map to (`a.jpg` and `a.png` in one folder both read
    `a.txt`): which image the boxes belong to is unknowable, so both are a problem, not counted twice."""
    owners: dict[Path, set[str]] = {}
    for files in files_by_split.values():
        for img in files:
            owners.setdefault(label_path(img), set()).add(str(img.resolve()))
    shared = {lab: sorted(o) for lab, o in owners.items() if len(o) > 1}
    for lab, imgs in shared.items():
        col.fail(lab, None, f"one label file for {len(imgs)} images with one stem ("
                 + ", ".join(Path(i).name for i in imgs) + "); give each image its own stem")
    return set(shared)


def _clip(col: _Collector, file: Path, line: int | None, box, w: int, h: int, where: str = ""):
    """The box clipped to the w x h image, or None after listing it when nothing of it is left:
    a zero-size box drops itself, never the image and its good boxes."""
    x0, x1 = float(np.clip(box[0], 0, w)), float(np.clip(box[2], 0, w))
    y0, y1 = float(np.clip(box[1], 0, h)), float(np.clip(box[3], 0, h))
    if x1 <= x0 or y1 <= y0:
        col.fail(file, line, f"{where}zero-size box {x0:g},{y0:g},{x1:g},{y1:g} once clipped to the {w}x{h} image")
        return None
    return x0, y0, x1, y1


def _parse_label_file(lab: Path, col: _Collector, names: list[str], nf: int, tol: float,
                      form: str) -> list[tuple[int, list[float]]] | None:
    """Validated (line number, values) of one label file; [] when missing/empty, None when skipped."""
    if not lab.is_file():
        return []
    rows = []
    for ln, line in enumerate(lab.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        v = line.split()
        if not v:
            continue
        if len(v) != nf:
            col.fail(lab, ln, f"expected {nf} fields ({form}), got {len(v)}")
            return None
        try:
            f = [float(x) for x in v]
        except ValueError:
            col.fail(lab, ln, f"non-numeric field in {line.strip()!r}")
            return None
        if not all(map(math.isfinite, f)):
            col.fail(lab, ln, f"non-finite number (nan/inf) in {line.strip()!r}")
            return None
        if f[0] != int(f[0]) or not 0 <= f[0] < len(names):
            col.fail(lab, ln, f"class id {v[0]} not in data.yaml names (0..{len(names) - 1})")
            return None
        if nf == 5:
            cx, cy, bw, bh = f[1:]
            if bw <= 0 or bh <= 0:
                col.fail(lab, ln, f"zero-size box: width/height must be > 0, got {bw:g} {bh:g}")
                continue
            coords = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        else:
            coords = f[1:]
        bad = [c for c in coords if c < -tol or c > 1 + tol]
        if bad:
            col.fail(lab, ln, f"normalised coordinate {bad[0]:g} outside [0, 1] (tolerance {tol})")
            return None
        rows.append((ln, f))
    return rows


def _write_yolo(ds: DetectionDataset, out: Path, obb: bool, images: str) -> Path:
    names = _all_names(ds)
    cid = {n: i for i, n in enumerate(names)}
    by_img = dict(tuple(ds.boxes.groupby("image_path")))
    splits = {}
    for split, group in ds.images.groupby("split", sort=False):
        seen: set[str] = set()
        for r in group.itertuples():
            src = Path(r.image_path)
            if src.name in seen:
                raise DataError(f"{src}: two images named {src.name} in split {split}; YOLO folders need unique names",
                                file=src)
            seen.add(src.name)
            dst = out / split / "images" / src.name
            _place_image(src, dst, images)
            lines = []
            for b in by_img.get(r.image_path, pd.DataFrame()).itertuples():
                box = (b.xmin, b.ymin, b.xmax, b.ymax)
                if obb:
                    c = b.obb if isinstance(b.obb, tuple | list) and len(b.obb) == 8 else box_corners(box)
                    lines.append(polygon_line(cid[b.label], c, r.width, r.height, clip=False))
                else:
                    lines.append(yolo_line(cid[b.label], box, r.width, r.height))
            write_label_file(out / split / "labels" / f"{src.stem}.txt", lines)
        splits[split] = f"{split}/images"
    return save_data_yaml(out / "data.yaml", names, splits)


def _place_image(src: Path, dst: Path, mode: str) -> None:
    """Symlink (default) or copy an image into an output folder, atomically; the source is untouched."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() and Path(os.readlink(dst)) == src or (mode == "copy" and dst.is_file()):
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    if mode == "link":
        try:
            os.symlink(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)  # filesystems without symlinks
    elif mode == "copy":
        shutil.copy2(src, tmp)
    else:
        raise ValueError(f"images must be 'link' or 'copy', not {mode!r}")
    os.replace(tmp, dst)


def _all_names(ds: DetectionDataset) -> list[str]:
    extra = sorted(set(ds.boxes.label) - set(ds.names))
    return list(ds.names) + extra


# --- COCO ----------------------------------------------------------------------------------------
def _resolve_image(name: str, base: Path, images_dir: Path | None) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    for cand in ([images_dir / name, images_dir / p.name] if images_dir else []) + [base / name,
                                                                                      base / "images" / name]:
        if cand.exists():
            return cand
    return (images_dir or base) / name


def _is_number(v) -> bool:
    """A finite int or float as JSON gives it (Python's json reads NaN and Infinity too)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _read_coco(path: Path, col: _Collector, split: str | None, images_dir: Path | None,
               verify: bool) -> DetectionDataset:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    images: list[dict] = []
    boxes: list[dict] = []
    names: list[str] = []
    for jf in files:
        try:
            d = json.loads(jf.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{jf}:{e.lineno}: not valid JSON ({e.msg})", file=jf, line=e.lineno) from e
        if not isinstance(d, dict) or not {"images", "annotations", "categories"} <= set(d):
            raise DataError(f"{jf}: not a COCO file (needs images, annotations, categories)", file=jf)
        cats = {c["id"]: str(c["name"]) for c in sorted(d["categories"], key=lambda c: c["id"])}
        names += [n for n in cats.values() if n not in names]
        sp = canonical_split(split or (jf.stem if canonical_split(jf.stem) in ("train", "val", "test") else "train"))
        anns: dict = {}
        for a in d["annotations"]:
            anns.setdefault(a.get("image_id"), []).append(a)
        for im in d["images"]:
            img = _resolve_image(im["file_name"], jf.parent, images_dir)
            size = (im["width"], im["height"]) if im.get("width") and im.get("height") else None
            if size and not all(_is_number(v) and v > 0 for v in size):
                col.fail(jf, None, f"image id {im['id']}: width/height must be positive numbers, got {size}")
                continue
            row_boxes, ok = [], True
            for a in anns.get(im["id"], []):
                where = f"annotation id {a.get('id')}"
                bbox = a.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4) or a.get("category_id") not in cats:
                    col.fail(jf, None, f"{where}: needs bbox [x, y, w, h] and a category_id in categories")
                    ok = False
                    break
                if not all(map(_is_number, bbox)):
                    col.fail(jf, None, f"{where}: bbox {bbox} must be four finite numbers")
                    ok = False
                    break
                x, y, bw, bh = (float(v) for v in bbox)
                if bw <= 0 or bh <= 0:
                    col.fail(jf, None, f"{where}: zero-size bbox, width/height must be > 0")
                    continue
                row_boxes.append((x, y, x + bw, y + bh, cats[a["category_id"]], where))
            if not ok:
                continue
            wh = _add_image(col, images, img, sp, str(jf), verify, size)
            if wh is None:
                continue
            for x0, y0, x1, y1, lab, where in row_boxes:
                boxes.append(_box(img, x0, y0, x1, y1, lab, sp, f"{jf}:{where}"))
    im, bx = _frames(images, boxes)
    return DetectionDataset(im, bx, names, col.problems, str(path), "coco")


def coco_image(image_id: int, file_name: str, width: int, height: int) -> dict:
    """One entry of a COCO `images` table."""
    return {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}


def coco_annotation(ann_id: int, image_id: int, box, category_id: int, **extra) -> dict:
    """One COCO annotation from a pixel box (x0, y0, x1, y1): bbox as [x, y, w, h], then `extra` keys
    (segmentation, score, synthetic) as the writer needs them."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, **extra}


def write_coco(path: str | Path, images: list[dict], annotations: list[dict], names: list[str] | dict[int, str]) -> Path:
    """Write a COCO JSON file atomically, the one writer of the format; `names` in class-id order
    (or an id -> name mapping, as a detector's names are) becomes the category table."""
    cats = names.items() if isinstance(names, dict) else enumerate(names)
    write_json(path, {"info": {"description": "written by synthgen"}, "images": images,
                      "categories": [{"id": int(i), "name": n, "supercategory": "none"} for i, n in cats],
                      "annotations": annotations})
    return Path(path)


def _write_coco(ds: DetectionDataset, out: Path) -> Path:
    names = _all_names(ds)
    cid = {n: i for i, n in enumerate(names)}
    for split, group in ds.images.groupby("split", sort=False):
        img_id = {p: i for i, p in enumerate(group.image_path, 1)}
        bx = ds.boxes[ds.boxes.image_path.isin(img_id)]
        write_coco(out / f"{split}.json",
                   [coco_image(img_id[r.image_path], r.image_path, r.width, r.height) for r in group.itertuples()],
                   [coco_annotation(j, img_id[b.image_path], (b.xmin, b.ymin, b.xmax, b.ymax), cid[b.label])
                    for j, b in enumerate(bx.itertuples(), 1)], names)
    return out


# --- Pascal VOC ----------------------------------------------------------------------------------
def _read_voc(path: Path, col: _Collector, split: str | None, images_dir: Path | None,
              verify: bool) -> DetectionDataset:
    if path.is_dir():
        groups = {split or "train": sorted(path.glob("*.xml"))}
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if any(sub.glob("*.xml")):
                groups[canonical_split(sub.name)] = sorted(sub.glob("*.xml"))
    else:
        groups = {split or "train": [path]}
    images: list[dict] = []
    boxes: list[dict] = []
    names: list[str] = []
    for sp, files in groups.items():
        for xf in files:
            try:
                root = ET.parse(xf).getroot()
            except ET.ParseError as e:
                col.fail(xf, e.position[0], f"not valid XML ({e})")
                continue
            fname = root.findtext("filename") or ""
            given = root.findtext("path")
            img = Path(given) if given and Path(given).is_file() else _resolve_image(fname, xf.parent, images_dir)
            try:
                sw, sh = int(float(root.findtext("size/width") or 0)), int(float(root.findtext("size/height") or 0))
            except (ValueError, OverflowError):  # nan / inf: read the size from the image instead
                sw = sh = 0
            row_boxes, ok = [], True
            for k, obj in enumerate(root.iter("object"), 1):
                try:
                    lab = (obj.findtext("name") or "").strip()
                    x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    col.fail(xf, None, f"object {k}: needs <name> and numeric <bndbox> xmin/ymin/xmax/ymax")
                    ok = False
                    break
                if not lab or not all(map(math.isfinite, (x0, y0, x1, y1))):
                    col.fail(xf, None, f"object {k}: needs a <name> and finite <bndbox> numbers")
                    ok = False
                    break
                if x1 <= x0 or y1 <= y0:
                    col.fail(xf, None, f"object {k}: zero-size box, xmax <= xmin or ymax <= ymin")
                    continue
                row_boxes.append((x0, y0, x1, y1, lab, k))
            if not ok:
                continue
            if _add_image(col, images, img, sp, str(xf), verify, (sw, sh) if sw > 0 and sh > 0 else None) is None:
                continue
            for x0, y0, x1, y1, lab, k in row_boxes:
                names += [lab] if lab not in names else []
                boxes.append(_box(img, x0, y0, x1, y1, lab, sp, f"{xf}:object {k}"))
    im, bx = _frames(images, boxes)
    return DetectionDataset(im, bx, sorted(names), col.problems, str(path), "voc")


def _write_voc(ds: DetectionDataset, out: Path) -> Path:
    by_img = dict(tuple(ds.boxes.groupby("image_path")))
    for r in ds.images.itertuples():
        src = Path(r.image_path)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = src.parent.name
        ET.SubElement(root, "filename").text = src.name
        ET.SubElement(root, "path").text = str(src)
        size = ET.SubElement(root, "size")
        for t, v in (("width", r.width), ("height", r.height), ("depth", 3)):
            ET.SubElement(size, t).text = str(int(v))
        for b in by_img.get(r.image_path, pd.DataFrame()).itertuples():
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = b.label
            ET.SubElement(obj, "difficult").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            for t in ("xmin", "ymin", "xmax", "ymax"):
                ET.SubElement(bb, t).text = f"{getattr(b, t):.3f}".rstrip("0").rstrip(".")
        ET.indent(root)
        with atomic_write(out / r.split / f"{src.stem}.xml", "wb") as f:
            ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=False)
    return out


# --- DeepForest CSV ------------------------------------------------------------------------------
CSV_COLUMNS = ["image_path", "xmin", "ymin", "xmax", "ymax", "label"]


def _read_csv(path: Path, col: _Collector, split: str | None, images_dir: Path | None,
              verify: bool) -> DetectionDataset:
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    images: list[dict] = []
    boxes: list[dict] = []
    for cf in files:
        try:
            df = pd.read_csv(cf, dtype={"image_path": str, "label": str}, keep_default_na=False,
                             na_values={c: [""] for c in CSV_COLUMNS[1:5]})
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise DataError(f"{cf}: not a readable CSV ({e})", file=cf) from e
        missing = [c for c in CSV_COLUMNS if c not in df.columns]
        if missing:
            raise DataError(f"{cf}:1: missing column(s) {missing}; expected {','.join(CSV_COLUMNS)}", file=cf, line=1)
        sp = canonical_split(split or (cf.stem if canonical_split(cf.stem) in ("train", "val", "test") else "train"))
        for name, g in df.groupby("image_path", sort=False):
            img = _resolve_image(name, cf.parent, images_dir)
            row_boxes, ok = [], True
            for i, r in g.iterrows():
                ln = int(i) + 2  # header is line 1
                try:
                    x0, y0, x1, y1 = (float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax"))
                except ValueError:
                    col.fail(cf, ln, "xmin/ymin/xmax/ymax must be numbers")
                    ok = False
                    break
                if (np.isnan([x0, y0, x1, y1]).all() or x0 == y0 == x1 == y1 == 0) and not r["label"]:
                    continue  # DeepForest's empty-image row
                if not all(map(math.isfinite, (x0, y0, x1, y1))) or not r["label"]:
                    col.fail(cf, ln, "box needs finite xmin, ymin, xmax, ymax (no nan/inf) and a label")
                    ok = False
                    break
                if x1 <= x0 or y1 <= y0:
                    col.fail(cf, ln, f"zero-size box {x0:g},{y0:g},{x1:g},{y1:g}: needs xmin < xmax and ymin < ymax")
                    continue
                row_boxes.append((x0, y0, x1, y1, r["label"], ln))
            if not ok:
                continue
            wh = _add_image(col, images, img, sp, str(cf), verify)
            if wh is None:
                continue
            w, h = wh
            for x0, y0, x1, y1, lab, ln in row_boxes:
                if x0 < -DETECT_TOL * w or y0 < -DETECT_TOL * h or x1 > (1 + DETECT_TOL) * w or y1 > (1 + DETECT_TOL) * h:
                    col.fail(cf, ln, f"box {x0:g},{y0:g},{x1:g},{y1:g} outside the {w}x{h} image")
                    images.pop()
                    boxes[:] = [b for b in boxes if b["image_path"] != str(img.resolve())]
                    break
                xyxy = _clip(col, cf, ln, (x0, y0, x1, y1), w, h)
                if xyxy:
                    boxes.append(_box(img, *xyxy, lab, sp, f"{cf}:{ln}"))
    im, bx = _frames(images, boxes)
    return DetectionDataset(im, bx, sorted(set(bx.label)), col.problems, str(path), "csv")


def _write_csv(ds: DetectionDataset, out: Path) -> Path:
    for split, group in ds.images.groupby("split", sort=False):
        bx = ds.boxes[ds.boxes.image_path.isin(set(group.image_path))][CSV_COLUMNS]
        empty = group[~group.image_path.isin(set(bx.image_path))]
        rows = pd.concat([bx, pd.DataFrame({"image_path": empty.image_path, "xmin": 0, "ymin": 0, "xmax": 0,
                                            "ymax": 0, "label": ""})], ignore_index=True)
        with atomic_write(out / f"{split}.csv", newline="") as f:
            rows.to_csv(f, index=False)
    return out


# --- vector boxes over GeoTIFFs -----------------------------------------------------------------
def _read_vector(path: Path, col: _Collector, split: str | None, raster: Path | None,
                 verify: bool, pixel_y: PixelY, notes: list[str]) -> DetectionDataset:
    """Vector boxes over images. Map coordinates need a CRS on both sides; with none on either
    (no .prj, plain PNG/JPG) they are image pixel coordinates, y down or negated (`pixel_y`)."""
    import geopandas as gpd
    import shapely

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in VECTOR_EXT) if path.is_dir() else [path]
    images: list[dict] = []
    boxes: list[dict] = []
    for vf in files:
        try:
            gdf = gpd.read_file(vf)
        except Exception as e:  # noqa: BLE001 - pyogrio raises several unrelated types
            raise DataError(f"{vf}: cannot read vector file ({e})", file=vf) from e
        if "label" not in gdf.columns:
            raise DataError(f"{vf}: needs a `label` column, has {list(gdf.columns)}", file=vf)
        _check_lonlat(vf, gdf)
        sp = canonical_split(split or (vf.stem if canonical_split(vf.stem) in ("train", "val", "test") else "train"))
        groups = {str(raster or _image_beside(vf)): gdf} if raster is not None or "image_path" not in gdf.columns \
            else dict(tuple(gdf.groupby("image_path", sort=False)))
        for name, g in groups.items():
            img = _resolve_image(name, vf.parent, None)
            geo = find_georef(img)
            if geo is None and g.crs is None:
                transform, size = _pixel_grid(vf, img, g, pixel_y, notes), None
            elif g.crs is None:
                raise DataError(f"{vf}: vector file has no CRS (for a shapefile: the .prj file is missing) but "
                                f"{img.name} is georeferenced ({geo.crs}); add the vector file's CRS", file=vf)
            elif geo is None:
                raise DataError(f"{img}: raster has no CRS, so map coordinates from {vf.name} cannot be placed on it",
                                file=img)
            else:
                g = g.to_crs(geo.crs) if not g.crs.equals(geo.crs) else g
                transform, size = geo.transform, (geo.width, geo.height)
            wh = _add_image(col, images, img, sp, str(vf), verify, size)
            if wh is None:
                continue
            w, h = wh
            bad = [i for i, gm in zip(g.index, g.geometry, strict=True) if gm is None or gm.is_empty]
            if bad:
                col.fail(vf, None, f"feature {bad[0] + 1}: empty geometry")
                images.pop()
                continue
            px = map_to_pixel_boxes(list(g.geometry), transform)
            for (i, r), box, gm in zip(g.iterrows(), px, g.geometry, strict=True):
                where = f"feature {i + 1}: "
                if not np.isfinite(box).all() or not np.isfinite(shapely.get_coordinates(gm)).all():
                    col.fail(vf, None, f"{where}coordinates are not finite numbers (nan/inf)")
                    continue
                if box[2] <= 0 or box[3] <= 0 or box[0] >= w or box[1] >= h:
                    col.fail(vf, None, f"{where}outside raster {img.name}")
                    continue
                xyxy = _clip(col, vf, None, box, w, h, where)
                if xyxy:
                    boxes.append(_box(img, *xyxy, str(r["label"]), sp, f"{vf}:feature {i + 1}",
                                      geometry=gm if size else None))
    im, bx = _frames(images, boxes)
    return DetectionDataset(im, bx, sorted(set(bx.label)), col.problems, str(path), "vector", notes)


def _check_lonlat(vf: Path, gdf) -> None:
    """In a geographic CRS (a GeoJSON without `crs` member is WGS84 by RFC 7946) coordinates beyond
    +-180 / +-90 are projected ones mislabelled: an error, not boxes that reproject to NaN."""
    if gdf.crs is None or not gdf.crs.is_geographic or gdf.empty:
        return
    import shapely

    xy = shapely.get_coordinates(gdf.geometry.dropna())
    xy = xy[np.isfinite(xy).all(axis=1)]
    off = xy[(np.abs(xy[:, 0]) > 180) | (np.abs(xy[:, 1]) > 90)]
    if len(off):
        raise DataError(f"{vf}: coordinate {off[0, 0]:.10g},{off[0, 1]:.10g} is outside longitude/latitude range of "
                        f"{gdf.crs.name} (a GeoJSON without a `crs` member is WGS84); give the file its real CRS",
                        file=vf)


def _image_beside(vf: Path) -> Path:
    """The one image with the vector file's stem next to it (per-image annotation layouts)."""
    found = [p for p in sorted(vf.parent.glob(f"{vf.stem}.*")) if p.suffix.lower() in IMG_EXT]
    if len(found) != 1:
        raise DataError(f"{vf}: no `image_path` column and {len(found)} images named {vf.stem}.* beside it; "
                        "pass the image or GeoTIFF it annotates (--raster)", file=vf)
    return found[0]


def _pixel_grid(vf: Path, img: Path, g, pixel_y: PixelY, notes: list[str]):
    """The pixel -> 'map' transform of vector boxes drawn in image pixels: identity with y down, or
    y negated (GIS tools draw an image without CRS with y up); `auto` takes negated when every y <= 0."""
    import shapely
    from rasterio.transform import Affine

    ys = shapely.get_coordinates(g.geometry.dropna())[:, 1]
    up = pixel_y == "up" or (pixel_y == "auto" and len(ys) > 0 and bool((ys <= 0).all()))
    why = "every y <= 0" if pixel_y == "auto" and up else "auto: some y > 0" if pixel_y == "auto" else "as asked"
    notes.append(f"{vf}: no CRS on it or on {img.name}: boxes read as image pixel coordinates, "
                 f"y {'negated' if up else 'down'} ({why}; --pixel-y down|up to choose)")
    return Affine(1, 0, 0, 0, -1 if up else 1, 0)


def _write_vector(ds: DetectionDataset, out: Path, ext: str) -> Path:
    import geopandas as gpd

    for split, group in ds.images.groupby("split", sort=False):
        frames, crs = [], None
        for r in group.itertuples():
            geo = read_georef(r.image_path)
            if crs is not None and not geo.crs.equals(crs):
                raise DataError(f"{r.image_path}: CRS {geo.crs} differs from the split's other rasters ({crs}); "
                                "write one vector file per CRS", file=r.image_path)
            crs = geo.crs
            bx = ds.boxes[ds.boxes.image_path == r.image_path]
            geoms = pixel_to_map_boxes(bx[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), geo.transform)
            frames.append(gpd.GeoDataFrame({"label": bx.label.to_numpy(), "image_path": r.image_path},
                                           geometry=geoms, crs=crs))
        gdf = pd.concat(frames, ignore_index=True) if frames else gpd.GeoDataFrame()
        gdf = gpd.GeoDataFrame(gdf, geometry="geometry", crs=crs)
        final = out / f"{split}{ext}"
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-vector-") as tmp:
            gdf.to_file(Path(tmp) / final.name, driver=VECTOR_EXT[ext])
            for f in Path(tmp).iterdir():  # a shapefile is several sidecar files
                os.replace(f, out / f.name)
    return out


# --- public API ----------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """Guess the format from a path: data.yaml -> yolo, *.json -> coco, *.xml -> voc, *.csv -> csv,
    *.gpkg/*.geojson/*.shp -> vector (folders: by what they contain)."""
    p = Path(path)
    if p.is_file():
        suf = p.suffix.lower()
        kinds = {".yaml": "yolo", ".yml": "yolo", ".json": "coco", ".xml": "voc", ".csv": "csv"}
        if suf in kinds:
            return kinds[suf]
        if suf in VECTOR_EXT:
            return "vector"
    elif p.is_dir():
        if (p / "data.yaml").is_file():
            return "yolo"
        for pattern, kind in (("*.json", "coco"), ("*.csv", "csv"), ("*.gpkg", "vector"), ("*.geojson", "vector"),
                              ("*.shp", "vector"), ("*.xml", "voc"), ("*/*.xml", "voc")):
            if any(p.glob(pattern)):
                return kind
    else:
        raise DataError(f"{p}: no such file or folder", file=p)
    raise DataError(f"{p}: cannot tell the annotation format; pass --format (fmt= in Python): yolo, yolo-obb, coco, voc, csv or vector",
                    file=p)


def read_dataset(path: str | Path, fmt: Format | None = None, on_error: OnError = "raise",
                 raster: str | Path | None = None, split: str | None = None, splits: list[str] | None = None,
                 images_dir: str | Path | None = None, names: list[str] | None = None,
                 verify: bool = False, pixel_y: PixelY = "auto") -> DetectionDataset:
    """Read any supported format into a DetectionDataset.

    `split` names the split of single-file formats (default: the file stem when it is train/val/test,
    else train); `splits` limits a data.yaml to some splits; `raster` is the GeoTIFF a vector file
    annotates; `names` fixes the class order for formats without ids (CSV, VOC, vector); `pixel_y` is
    the y direction of vector boxes in pixel coordinates (no CRS on the file or the image)."""
    path = Path(path)
    if pixel_y not in ("auto", "down", "up"):
        raise ValueError(f"pixel_y must be auto, down or up, not {pixel_y!r}")
    fmt = fmt or detect_format(path)
    col = _Collector(on_error)
    idir = Path(images_dir) if images_dir else None
    if fmt in ("yolo", "yolo-obb"):
        ds = _read_yolo(path, col, {"yolo": None, "yolo-obb": True}[fmt], splits, verify)
    elif fmt == "coco":
        ds = _read_coco(path, col, split, idir, verify)
    elif fmt == "voc":
        ds = _read_voc(path, col, split, idir, verify)
    elif fmt == "csv":
        ds = _read_csv(path, col, split, idir, verify)
    elif fmt == "vector":
        ds = _read_vector(path, col, split, Path(raster) if raster else None, verify, pixel_y, [])
    else:
        raise DataError(f"{path}: unknown format {fmt!r}", file=path)
    if names is not None:
        unknown = sorted(set(ds.boxes.label) - set(names))
        if unknown:
            raise DataError(f"{path}: labels {unknown} are not in the given names", file=path)
        ds.names = list(names)
    return ds


def write_dataset(ds: DetectionDataset, out: str | Path, fmt: str = "yolo", images: str = "link") -> Path:
    """Write `ds` under `out` (yolo, yolo-obb, coco, voc, csv, gpkg, geojson, shp); returns the main path.

    YOLO folders get symlinks to the images (`images="copy"` copies); other formats reference the
    images by absolute path. Refuses to write inside a folder the images come from."""
    out = Path(out).resolve()
    for d in {str(Path(p).parent.resolve()) for p in ds.images.image_path} | ({ds.root} if ds.root else set()):
        d = Path(d) if Path(d).is_dir() else Path(d).parent
        if out == d.resolve() or d.resolve() in out.parents:
            raise DataError(f"{out}: inside the input folder {d}; write the converted dataset elsewhere", file=out)
    xyxy = ds.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    if not np.isfinite(xyxy).all():
        bad = ds.boxes.source.iloc[int(np.flatnonzero(~np.isfinite(xyxy).all(axis=1))[0])]
        raise DataError(f"{bad}: box coordinates are not finite (nan/inf); nothing written to {out}", file=bad)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("yolo", "yolo-obb"):
        return _write_yolo(ds, out, fmt == "yolo-obb", images)
    if fmt == "coco":
        return _write_coco(ds, out)
    if fmt == "voc":
        return _write_voc(ds, out)
    if fmt == "csv":
        return _write_csv(ds, out)
    if f".{fmt}" in VECTOR_EXT:
        return _write_vector(ds, out, f".{fmt}")
    raise DataError(f"unknown output format {fmt!r}; use yolo, yolo-obb, coco, voc, csv, gpkg, geojson or shp")

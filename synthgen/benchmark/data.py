"""Reading the benchmark dataset and laying out YOLO image lists without touching the input.

Images are symlinked (never copied, never modified) into `work/data/images/<split>/`, with
axis-aligned YOLO labels written beside them in `work/data/labels/<split>/`; image lists
(`*.txt`) then select subsets, which is what ultralytics trains from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

from synthgen.errors import SynthgenError
from synthgen.io_utils import atomic_write

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLIT_ALIASES = {"valid": "val", "validation": "val"}  # as detection.read_dataset names them


def canonical_split(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


class BenchmarkDataError(SynthgenError):
    """The benchmark dataset is missing a split or has unreadable labels."""


def _read_yolo(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """YOLO / YOLO-OBB folder with data.yaml -> (images, boxes, names) in the canonical columns.

    Used when `detection.read_dataset` (the dataset I/O module) is not importable; OBB corners
    become their clipped axis-aligned box, as the datasets' READMEs specify."""
    from PIL import Image

    dy = root / "data.yaml"
    if not dy.is_file():
        raise BenchmarkDataError(f"{root}: no data.yaml")
    d = yaml.safe_load(dy.read_text(encoding="utf-8")) or {}
    names = d["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    imgs, boxes = [], []
    for split_dir in sorted(p for p in root.iterdir() if (p / "images").is_dir()):
        for img in sorted((split_dir / "images").iterdir()):
            if img.suffix.lower() not in IMG_EXT:
                continue
            with Image.open(img) as im:
                w, h = im.size
            imgs.append({"image_path": str(img.resolve()), "width": w, "height": h, "split": split_dir.name})
            lab = split_dir / "labels" / f"{img.stem}.txt"
            if not lab.is_file():
                continue
            for ln, line in enumerate(lab.read_text().splitlines(), 1):
                v = line.split()
                if not v:
                    continue
                try:
                    c, xy = int(v[0]), [float(x) for x in v[1:]]
                except ValueError as e:
                    raise BenchmarkDataError(f"{lab}:{ln}: not a YOLO label line ({e})") from e
                if len(xy) == 4:
                    cx, cy, bw, bh = xy
                    x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                elif len(xy) >= 6 and len(xy) % 2 == 0:
                    x0, x1, y0, y1 = min(xy[0::2]), max(xy[0::2]), min(xy[1::2]), max(xy[1::2])
                else:
                    raise BenchmarkDataError(f"{lab}:{ln}: expected 5 or 1+2k values, got {len(v)}")
                if not 0 <= c < len(names):
                    raise BenchmarkDataError(f"{lab}:{ln}: class {c} not in data.yaml names")
                x0, x1 = max(0.0, x0) * w, min(1.0, x1) * w
                y0, y1 = max(0.0, y0) * h, min(1.0, y1) * h
                if x1 > x0 and y1 > y0:
                    boxes.append({"image_path": str(img.resolve()), "xmin": x0, "ymin": y0, "xmax": x1,
                                  "ymax": y1, "label": names[c], "split": split_dir.name})
    cols = ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "split"]
    return pd.DataFrame(imgs), pd.DataFrame(boxes, columns=cols), names


def load_dataset(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(images, boxes, names) via `detection.read_dataset` when available, else the YOLO reader."""
    root = Path(root)
    try:
        from detection import read_dataset
    except ImportError:
        images, boxes, names = _read_yolo(root)
    else:
        ds = read_dataset(root)
        images, names = ds.images.copy(), list(ds.names)
        boxes = ds.boxes[["image_path", "xmin", "ymin", "xmax", "ymax", "label", "split"]].copy()
    images["split"] = images.split.map(canonical_split)
    boxes["split"] = boxes.split.map(canonical_split)
    return images, boxes, names


def materialize(images: pd.DataFrame, boxes: pd.DataFrame, names: list[str], out: Path) -> dict[str, str]:
    """Symlink each image into out/images/<split>/ and write its YOLO label; returns original -> link."""
    cid = {n: i for i, n in enumerate(names)}
    by_img = {k: g for k, g in boxes.groupby("image_path")}
    mapping = {}
    for r in images.itertuples():
        src = Path(r.image_path)
        link = out / "images" / r.split / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(src, link)
        lines = []
        g = by_img.get(r.image_path)
        if g is not None:
            for b in g.itertuples():
                cx, cy = (b.xmin + b.xmax) / 2 / r.width, (b.ymin + b.ymax) / 2 / r.height
                bw, bh = (b.xmax - b.xmin) / r.width, (b.ymax - b.ymin) / r.height
                lines.append(f"{cid[b.label]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
        with atomic_write(out / "labels" / r.split / f"{src.stem}.txt") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
        mapping[r.image_path] = str(link)
    return mapping


def write_list(path: Path, files: list[str]) -> Path:
    with atomic_write(path) as f:
        f.write("\n".join(files) + "\n")
    return path

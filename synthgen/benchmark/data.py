"""Reading the benchmark dataset and laying out YOLO image lists without touching the input.

Images are symlinked (never copied, never modified) into `work/data/images/<split>/`, with
axis-aligned YOLO labels written beside them in `work/data/labels/<split>/`; image lists
(`*.txt`) then select subsets, which is what ultralytics trains from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from synthgen.io_utils import atomic_write

SPLIT_ALIASES = {"valid": "val", "validation": "val"}  # as detection.read_dataset names them


def canonical_split(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def load_dataset(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(images, boxes, names) through `detection.read_dataset`, split names canonical."""
    from detection import read_dataset

    ds = read_dataset(Path(root))
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

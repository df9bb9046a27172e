"""Reading the benchmark dataset and laying out YOLO image lists without touching the input.

Images are symlinked (never copied, never modified) into `work/data/images/<split>/`, with
axis-aligned YOLO labels written beside them in `work/data/labels/<split>/`; image lists
(`*.txt`) then select subsets, which is what ultralytics trains from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from detection.dataset import canonical_split, label_path, write_label_file, yolo_line
from synthgen.io_utils import atomic_write


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
        g = by_img.get(r.image_path)
        lines = [] if g is None else [yolo_line(cid[b.label], (b.xmin, b.ymin, b.xmax, b.ymax), r.width, r.height)
                                      for b in g.itertuples()]
        write_label_file(out / "labels" / r.split / f"{src.stem}.txt", lines)
        mapping[r.image_path] = str(link)
    return mapping


def write_list(path: Path, files: list[str]) -> Path:
    with atomic_write(path) as f:
        f.write("\n".join(files) + "\n")
    return path


def cut_windows(images: list[str], out: Path, window: int, overlap: float, min_visible: float) -> dict[str, list[str]]:
    """Cut each image (with its YOLO label) into `window` px squares at full resolution.

    Why: a detector trained on windows at imgsz = window sees every animal at its own pixel size,
    where resizing whole tiles to a small imgsz shrinks seals to a few pixels. A box cut by a window
    edge is clipped and kept if `min_visible` of it is inside, else dropped. Returns image -> windows."""
    import numpy as np
    from PIL import Image

    from detection.infer import tile_origins

    out_images, out_labels = out / "images", out / "labels"
    out_images.mkdir(parents=True, exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[str]] = {}
    for src in images:
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        lab = label_path(Path(src))
        rows = [ln.split() for ln in lab.read_text().splitlines() if ln.strip()] if lab.is_file() else []
        b = np.array([[float(v) for v in r[1:5]] for r in rows]).reshape(-1, 4)
        cls = [r[0] for r in rows]
        xyxy = np.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                         (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], 1)
        area = np.clip((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 1e-9, None)
        index[src] = []
        for y0 in tile_origins(h, window, overlap):
            for x0 in tile_origins(w, window, overlap):
                ww, wh = min(window, w - x0), min(window, h - y0)
                c = xyxy.copy()
                c[:, [0, 2]] = np.clip(c[:, [0, 2]] - x0, 0, ww)
                c[:, [1, 3]] = np.clip(c[:, [1, 3]] - y0, 0, wh)
                vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) / area
                lines = [yolo_line(k, x, ww, wh) for k, x, v in zip(cls, c, vis, strict=True) if v >= min_visible]
                name = f"{Path(src).stem}__{x0}_{y0}"
                dst = out_images / f"{name}.jpg"
                with atomic_write(dst, "wb") as f:
                    rgb.crop((x0, y0, x0 + ww, y0 + wh)).save(f, format="JPEG", quality=95)
                write_label_file(out_labels / f"{name}.txt", lines)
                index[src].append(str(dst))
    return index

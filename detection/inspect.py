"""Dataset statistics for `synthgen data inspect`: what is there, how big the boxes are, what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detection.dataset import DetectionDataset


def inspect_dataset(ds: DetectionDataset) -> dict:
    """Per split: image count, empty images (no boxes; for YOLO also how many lack a label file), boxes per class, box sizes in pixels
    (min/median/max of width and height, overall and per class); plus the problems found."""
    per_image = ds.images.groupby("image_path").split.nunique()
    out: dict = {"format": ds.fmt, "root": ds.root, "names": list(ds.names), "splits": {},
                 "problems": list(ds.problems), "notes": list(ds.notes),
                 "images_in_several_splits": sorted(per_image.index[per_image > 1])}
    for split in ds.splits:
        im = ds.images[ds.images.split == split]
        bx = ds.boxes[ds.boxes.split == split]
        with_boxes = set(bx.image_path)
        w, h = (bx.xmax - bx.xmin).to_numpy(), (bx.ymax - bx.ymin).to_numpy()
        counts = bx.label.value_counts()
        out["splits"][split] = {
            "images": int(len(im)),
            "empty_images": int((~im.image_path.isin(with_boxes)).sum()),
            "missing_label_files": (int(sum(not Path(f).is_file() for f in im.source))
                                    if ds.fmt in ("yolo", "yolo-obb") else 0),
            "boxes": int(len(bx)),
            "boxes_per_class": {n: int(counts.get(n, 0)) for n in ds.names} | {
                n: int(c) for n, c in counts.items() if n not in ds.names},
            "box_size": _size_stats(w, h),
            "box_size_per_class": {n: _size_stats((g.xmax - g.xmin).to_numpy(), (g.ymax - g.ymin).to_numpy())
                                   for n, g in bx.groupby("label")},
            "image_sizes": {f"{a}x{b}": int(c) for (a, b), c in im.groupby(["width", "height"]).size().items()},
        }
    return out


def _size_stats(w: np.ndarray, h: np.ndarray) -> dict:
    if len(w) == 0:
        return {}
    return {f"{k}_{f.__name__.replace('nan', '')}": round(float(f(v)), 1)
            for k, v in (("w", w), ("h", h)) for f in (np.min, np.median, np.max)}


def report_tables(stats: dict) -> list:
    """Rich tables for the CLI (kept here so notebooks can render the same view). Problems and notes
    are plain `file:line: reason` lines, never a table column: a table cuts paths to fit the terminal."""
    from rich.table import Table
    from rich.text import Text

    splits = list(stats["splits"])
    t = Table(title=f"{stats['format']} dataset: images and boxes per split")
    t.add_column("")
    for s in splits:
        t.add_column(s, justify="right")
    sp = stats["splits"]
    t.add_row("images", *[str(sp[s]["images"]) for s in splits])
    t.add_row("empty images", *[str(sp[s]["empty_images"]) for s in splits])
    if any(sp[s]["missing_label_files"] for s in splits):
        t.add_row("  no label file", *[str(sp[s]["missing_label_files"]) for s in splits])
    t.add_row("boxes", *[str(sp[s]["boxes"]) for s in splits])
    labels = list(dict.fromkeys(n for s in splits for n in sp[s]["boxes_per_class"]))
    for n in labels:
        t.add_row(f"  {n}", *[str(sp[s]["boxes_per_class"].get(n, 0)) for s in splits])
    sizes = Table(title="box size in pixels (min / median / max)")
    for c in ("split", "class", "width", "height"):
        sizes.add_column(c, justify="right" if c in ("width", "height") else "left")
    for s in splits:
        rows = [("all", sp[s]["box_size"])] + list(sp[s]["box_size_per_class"].items())
        for n, st in rows:
            if st:
                sizes.add_row(s, n, f"{st['w_min']:g} / {st['w_median']:g} / {st['w_max']:g}",
                              f"{st['h_min']:g} / {st['h_median']:g} / {st['h_max']:g}")
    tables = [t, sizes]
    if stats["images_in_several_splits"]:
        leak = Table(title=f"{len(stats['images_in_several_splits'])} images in more than one split (leak)")
        leak.add_column("image")
        for p in stats["images_in_several_splits"][:20]:
            leak.add_row(p)
        tables.append(leak)
    if stats["problems"]:
        lines = [f"{len(stats['problems'])} problems (skipped):"] + [
            f"{r['file']}{':' + str(r['line']) if r['line'] else ''}: {r['reason']}" for r in stats["problems"]]
        tables.append(Text("\n".join(lines), no_wrap=True, overflow="ignore"))
    tables += [Text(f"note: {n}", no_wrap=True, overflow="ignore") for n in stats.get("notes", [])]
    return tables


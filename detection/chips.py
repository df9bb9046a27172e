"""Square chips of real instances with some context: what the diffusion generator trains on.

Each box becomes a square centred on it, side = max(w, h) * (1 + 2 * margin), padded by edge
replication (or reflection) where it runs off the image, resized to `size`. Chips land in
`OUT/<split>/<label>/<stem>_<k>.png` with one manifest row each (docs/ARCHITECTURE.md); a rerun
skips chips already in the manifest, so a killed job resumes without duplicates.

`make_background_chips` cuts the negatives of the same images: squares that touch no box, sized
like the animal chips, so a judge can learn "animal or not" from what an animal chip minus the
animal looks like.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from detection.dataset import TIFF_EXT, DetectionDataset, open_image, read_dataset
from detection.errors import DataError
from synthgen.io_utils import JsonlAppender, atomic_save_image, atomic_write, read_jsonl, write_json


class ChipConfig(BaseModel):
    """How chips are cut; stored in OUT/chips.json so a resume cannot mix two settings."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=8, description="side of the square chip in pixels")
    margin: float = Field(0.15, ge=0, le=2, description="context on each side, as a fraction of max(w, h)")
    pad: Literal["replicate", "reflect"] = Field("replicate", description="fill where the square leaves the image")
    min_box: float = Field(4, ge=0, description="skip boxes whose shorter side is below this (pixels)")
    max_per_class: int | None = Field(None, ge=1, description="at most this many chips per label (seeded sample)")
    seed: int = 0


def square_window(box: tuple[float, float, float, float], margin: float) -> tuple[int, int, int]:
    """Integer (x0, y0, side) of the context square centred on `box`."""
    x0, y0, x1, y1 = box
    side = max(1, round(max(x1 - x0, y1 - y0) * (1 + 2 * margin)))
    return round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2), side


def cut_chip(image: np.ndarray, box: tuple[float, float, float, float], size: int = 64, margin: float = 0.15,
             pad: str = "replicate") -> np.ndarray:
    """The square context chip of one box from an HxWxC uint8 array, resized to size x size."""
    import cv2

    h, w = image.shape[:2]
    sx, sy, side = square_window(box, margin)
    cx0, cy0, cx1, cy1 = max(sx, 0), max(sy, 0), min(sx + side, w), min(sy + side, h)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"box {box} lies outside the {w}x{h} image")
    crop = image[cy0:cy1, cx0:cx1]
    pads = ((cy0 - sy, sy + side - cy1), (cx0 - sx, sx + side - cx1)) + ((0, 0),) * (image.ndim - 2)
    if any(p for pair in pads for p in pair):
        mode = "edge" if pad == "replicate" or min(crop.shape[:2]) < 2 else "reflect"
        crop = np.pad(crop, pads, mode=mode)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def load_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 pixels, EXIF rotation applied; GeoTIFFs PIL cannot decode (16-bit, multiband)
    are read with rasterio, first three bands rescaled to 0..255."""
    from PIL import ImageOps

    try:
        with open_image(path, load=True) as im:  # a header that claims more pixels than the file holds is an error
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except DataError:
        if Path(path).suffix.lower() not in TIFF_EXT or not Path(path).is_file():
            raise
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as src:
            a = src.read(list(range(1, min(src.count, 3) + 1))).astype(np.float32)
    except RasterioIOError as e:
        raise DataError(f"{path}: cannot read image ({e})", file=path, reason=f"cannot read image ({e})") from e
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
    return np.clip((a - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _taxon_info(tax, label: str) -> tuple[str, dict]:
    """Taxon name and {level: name} lineage of a dataset label (through tax.labels, else tax.resolve)."""
    t = tax.labels.get(label) or tax.resolve(label)
    return t.name, {a.level: a.name for a in tax.lineage(t)}


def _split_dataset(data: str | Path | DetectionDataset, split: str | None, on_error: str) -> DetectionDataset:
    """The dataset (read if a path) restricted to `split` (None: all splits), with a clear error if absent."""
    ds = data if isinstance(data, DetectionDataset) else read_dataset(
        data, on_error=on_error, splits=None if split is None else [split])
    if split is not None:
        if split not in ds.splits:
            have = ds.splits if isinstance(data, DetectionDataset) else read_dataset(data, on_error="skip").splits
            raise DataError(f"{ds.root}: no split {split!r} (has {', '.join(have) or 'none'})", file=ds.root)
        ds = ds.subset(split)
    return ds


def _load_or_skip(img_path: str, on_error: str, problems: list[dict]):
    """The image as RGB, or None after listing it in `problems` when `on_error` is "skip"."""
    try:
        return load_rgb(img_path)
    except DataError as e:
        if on_error != "skip":
            raise
        problems.append({"file": img_path, "line": None, "reason": e.reason})
        return None


def make_chips(data: str | Path | DetectionDataset, out: str | Path, cfg: ChipConfig | None = None,
               taxonomy: str | Path | None = None, split: str | None = "train", on_error: str = "raise",
               progress: bool = True) -> dict:
    """Cut chips of every box in `split` (None: all splits) into `out`; resumable. Returns a summary.
    The progress bar erases itself, so an error or the summary after it starts a clean line."""
    from PIL import Image
    from tqdm import tqdm

    cfg = cfg or ChipConfig()
    out = Path(out)
    ds = _split_dataset(data, split, on_error)
    _check_config(out, cfg.model_dump() | {"taxonomy": bool(taxonomy)})
    tax = None
    if taxonomy is not None:
        from taxonomy import Taxonomy

        tax = Taxonomy.load(taxonomy)
        lineages = {lab: _taxon_info(tax, lab) for lab in sorted(set(ds.boxes.label))}  # fail early on unknowns
        tax.save(out / "taxonomy.json")
    boxes = _select(ds, cfg)
    manifest = out / "manifest.jsonl"
    done = {r["file"] for r in read_jsonl(manifest)}
    stems = chip_stems(ds.images.image_path)
    boxes = boxes.assign(file=[f"{r.split}/{r.label}/{stems[r.image_path]}_{r.k}.png" for r in boxes.itertuples()])
    todo = boxes[~boxes.file.isin(done)]
    written: Counter = Counter()
    problems = list(ds.problems)
    with JsonlAppender(manifest) as app, tqdm(total=len(todo), desc="chips", unit="chip",
                                              disable=not progress, leave=False) as bar:
        for img_path, g in todo.groupby("image_path", sort=True):
            arr = _load_or_skip(img_path, on_error, problems)
            if arr is None:
                bar.update(len(g))
                continue
            for r in g.itertuples():
                chip = cut_chip(arr, (r.xmin, r.ymin, r.xmax, r.ymax), cfg.size, cfg.margin, cfg.pad)
                atomic_save_image(Image.fromarray(chip), out / r.file)
                taxon, lineage = lineages[r.label] if tax else (r.label, {})
                app.write({"file": r.file, "source_image": img_path,
                           "box": [round(float(v), 2) for v in (r.xmin, r.ymin, r.xmax, r.ymax)],
                           "label": r.label, "taxon": taxon, "lineage": lineage, "split": r.split,
                           "size": cfg.size})
                written[r.label] += 1
                bar.update(1)
    return {"out": str(out), "manifest": str(manifest), "written": sum(written.values()),
            "already_done": len(boxes) - len(todo), "total": len(read_jsonl(manifest)),
            "per_label": dict(written), "skipped_small": int(_small(ds.boxes, cfg.min_box).sum()),
            "skipped_cap": int((~_small(ds.boxes, cfg.min_box)).sum() - len(boxes)), "problems": problems}


def chip_stems(image_paths) -> dict[str, str]:
    """Image path -> the stem its chips are named by: the file stem, plus a hash of the path where
    two images share a stem (a.jpg and a.png, or one name in two folders), so no chip overwrites
    another and manifest rows always match files."""
    by_stem: dict[str, set[str]] = {}
    for p in image_paths:
        by_stem.setdefault(Path(p).stem, set()).add(p)
    return {p: stem if len(ps) == 1 else f"{stem}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
            for stem, ps in by_stem.items() for p in ps}


def _small(boxes, min_box: float):
    return np.minimum(boxes.xmax - boxes.xmin, boxes.ymax - boxes.ymin) < min_box


def _select(ds: DetectionDataset, cfg: ChipConfig):
    """Boxes to cut, each with its stable index k within its image (so names survive a resume);
    max_per_class keeps a seeded random sample per label."""
    bx = ds.boxes.copy()
    bx["k"] = bx.groupby("image_path").cumcount()
    bx = bx[~_small(bx, cfg.min_box)]
    if cfg.max_per_class:
        shuffled = bx.sample(frac=1, random_state=cfg.seed)
        bx = shuffled[shuffled.groupby("label").cumcount() < cfg.max_per_class].sort_index()
    return bx


def _check_config(out: Path, want: dict) -> None:
    """Record the settings; a resume into a folder cut with other settings is an error, not a mix."""
    meta = out / "chips.json"
    if meta.is_file():
        have = json.loads(meta.read_text(encoding="utf-8"))
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise DataError(f"{meta}: {out} was cut with other settings {diff} (was, now); use a new --out",
                            file=meta)
    else:
        write_json(meta, want)


BACKGROUND = "background"  # label and taxon of background chips (rows also carry "background": true)


def _overlaps(window: np.ndarray, boxes: np.ndarray, max_overlap: float) -> bool:
    """Whether the window covers more than `max_overlap` of any box's area (0: touches none)."""
    if not len(boxes):
        return False
    iw = np.minimum(window[2], boxes[:, 2]) - np.maximum(window[0], boxes[:, 0])
    ih = np.minimum(window[3], boxes[:, 3]) - np.maximum(window[1], boxes[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return bool((inter > max_overlap * area).any())


def plan_background(ds: DetectionDataset, n: int, cfg: ChipConfig, max_overlap: float = 0.0,
                    tries: int = 50) -> list[dict]:
    """`n` seeded windows (image, x0, y0, side) clear of every box; sides are drawn from the context
    squares of the boxes `make_chips` would cut, windows lie inside the image (no padding). Window j
    depends only on the seed and windows before it, so a larger `n` extends a smaller one."""
    sel = _select(ds, cfg)
    if sel.empty:
        raise DataError(f"{ds.root}: no boxes to take background chip sizes from", file=ds.root)
    sides = np.array([square_window((r.xmin, r.ymin, r.xmax, r.ymax), cfg.margin)[2] for r in sel.itertuples()])
    images = ds.images.sort_values("image_path")
    paths, splits = images.image_path.tolist(), images.split.tolist()
    wh = images[["width", "height"]].to_numpy(int)
    boxes = {p: g[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float) for p, g in ds.boxes.groupby("image_path")}
    rng = np.random.default_rng(cfg.seed)
    plan = []
    for j in range(n):
        for _ in range(tries):
            i = int(rng.integers(len(paths)))
            (w, h), side = wh[i], int(min(sides[rng.integers(len(sides))], *wh[i]))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            if not _overlaps(np.array([x0, y0, x0 + side, y0 + side]), boxes.get(paths[i], np.zeros((0, 4))),
                             max_overlap):
                plan.append({"j": j, "image_path": paths[i], "split": splits[i], "x0": x0, "y0": y0, "side": side})
                break
    return plan


def make_background_chips(data: str | Path | DetectionDataset, out: str | Path, n: int | None = None,
                          cfg: ChipConfig | None = None, split: str | None = "train", max_overlap: float = 0.0,
                          on_error: str = "raise", progress: bool = True) -> dict:
    """Cut `n` background chips (None: as many as `make_chips` would cut animal chips) from `split`
    (None: all splits) into `out`: `OUT/<split>/background/<stem>_bg<j>.png`, manifest rows like
    animal chips with label and taxon "background", `"background": true` and no lineage. Resumable."""
    from PIL import Image
    from tqdm import tqdm

    cfg = cfg or ChipConfig()
    out = Path(out)
    if not 0 <= max_overlap < 1:
        raise ValueError(f"max_overlap must be in [0, 1), got {max_overlap}")
    ds = _split_dataset(data, split, on_error)
    n = len(_select(ds, cfg)) if n is None else n
    if n < 1:
        raise ValueError(f"background chip count must be >= 1, got {n}")
    _check_config(out, cfg.model_dump() | {BACKGROUND: {"n": n, "max_overlap": max_overlap}})
    plan = plan_background(ds, n, cfg, max_overlap)
    for w in plan:
        w["file"] = f"{w['split']}/{BACKGROUND}/{Path(w['image_path']).stem}_bg{w['j']}.png"
    manifest = out / "manifest.jsonl"
    done = {r["file"] for r in read_jsonl(manifest)}
    todo = [w for w in plan if w["file"] not in done]
    problems = list(ds.problems)
    written = 0
    with JsonlAppender(manifest) as app, tqdm(total=len(todo), desc="background chips", unit="chip",
                                              disable=not progress, leave=False) as bar:
        by_image: dict[str, list[dict]] = {}
        for w in todo:
            by_image.setdefault(w["image_path"], []).append(w)
        for img_path in sorted(by_image):
            arr = _load_or_skip(img_path, on_error, problems)
            if arr is None:
                bar.update(len(by_image[img_path]))
                continue
            for w in by_image[img_path]:
                box = (w["x0"], w["y0"], w["x0"] + w["side"], w["y0"] + w["side"])
                atomic_save_image(Image.fromarray(cut_chip(arr, box, cfg.size, 0.0, cfg.pad)), out / w["file"])
                app.write({"file": w["file"], "source_image": img_path, "box": list(box), "label": BACKGROUND,
                           "taxon": BACKGROUND, BACKGROUND: True, "split": w["split"], "size": cfg.size})
                written += 1
                bar.update(1)
    return {"out": str(out), "manifest": str(manifest), "written": written, "already_done": len(plan) - len(todo),
            "total": len(read_jsonl(manifest)), "unplaced": n - len(plan), "problems": problems}


def subset_chips(src: str | Path, out: str | Path, keep: Callable[[str], bool]) -> Path:
    """A new chips folder with only the rows of `src` whose label passes `keep` (PNGs copied,
    taxonomy.json kept): e.g. the chips of the new taxa for `synthgen train --add-taxa`."""
    src, out = Path(src), Path(out)
    rows = [r for r in read_jsonl(src / "manifest.jsonl") if keep(r["label"])]
    for r in rows:
        (out / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / r["file"], out / r["file"])
    if (src / "taxonomy.json").is_file():
        shutil.copy2(src / "taxonomy.json", out / "taxonomy.json")
    with atomic_write(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return out

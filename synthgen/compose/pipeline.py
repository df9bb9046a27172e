"""`augment-dataset`: paste pool instances into real background tiles and write a new detection
dataset (YOLO detect + seg labels, COCO JSON, data.yaml with separate real/synthetic lists,
GeoTIFF + GeoPackage for georeferenced inputs, per-instance provenance, previews).

Resumable: `manifest.jsonl` (one row per finished output tile, appended after its files are
written atomically) is the truth; a rerun skips the tiles listed there and drops provenance rows
of tiles that never reached it. Every tile has its own seed, so results do not depend on the
number of worker processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from detection.dataset import (
    box_corners,
    coco_annotation,
    coco_image,
    polygon_line,
    save_data_yaml,
    write_coco,
    yolo_line,
)
from synthgen.compose.blend import (
    build_tile_aug,
    estimate_jpeg_quality,
    jpeg_bytes,
    paste,
    transform_instance,
)
from synthgen.compose.config import ComposeConfig
from synthgen.compose.masks import compute_mask_cached
from synthgen.compose.placement import (
    color_habitat,
    find_position,
    raster_habitat,
    sample_count,
    uniform_edge_region,
    vector_habitat,
)
from synthgen.compose.scale import DatasetSizes, gsd_from_transform, physical_length_px
from synthgen.errors import SynthgenError
from synthgen.io_utils import (
    JsonlAppender,
    atomic_write,
    dataset_inputs,
    read_jsonl,
    refuse_inside_inputs,
    write_json,
    write_jsonl,
)
from synthgen.pool import MANIFEST, read_pool, read_pool_lines

RASTER_EXT = {".tif", ".tiff"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class AugmentResult:
    """Counts for the one-line summary. Tiles where nothing could be placed are not written
    (`n_empty`); `pools` says per pool what it gave and why instances were rejected; `problems`
    lists the backgrounds skipped with on_error="skip"."""

    out: Path
    n_tiles: int
    n_pasted: int
    n_skipped_instances: int
    n_masks_rejected: int
    data_yaml: Path
    n_empty: int = 0
    pools: dict[str, dict] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)


# --- inputs ---------------------------------------------------------------------------------------
def _background_dataset(path: Path, on_error: str):
    """A folder of unannotated tiles/GeoTIFFs (or one file) as a dataset table with no boxes."""
    from detection import DetectionDataset
    from detection.dataset import BOX_COLUMNS, IMAGE_COLUMNS, image_size

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise SynthgenError(f"{path}: no images or GeoTIFFs found")
    rows, problems = [], []
    for f in files:
        try:
            w, h = image_size(f)
        except SynthgenError as e:
            if on_error == "raise":
                raise
            problems.append({"file": str(f), "line": None, "reason": str(e)})
            continue
        rows.append({"image_path": str(f.resolve()), "width": w, "height": h, "split": "train", "source": "folder"})
    return DetectionDataset(pd.DataFrame(rows, columns=IMAGE_COLUMNS), pd.DataFrame(columns=BOX_COLUMNS), [],
                            problems, root=str(path))


def load_backgrounds(dataset: str | Path, on_error: str = "raise"):
    """A detection dataset (any format detection reads) or a folder/file of bare background tiles."""
    from detection import read_dataset

    p = Path(dataset)
    if not p.exists():
        raise SynthgenError(f"{p}: dataset not found")
    bare = p.is_file() and p.suffix.lower() in IMAGE_EXT or (
        p.is_dir() and not (p / "data.yaml").exists() and any(x.suffix.lower() in IMAGE_EXT for x in p.iterdir()))
    return _background_dataset(p, on_error) if bare else read_dataset(p, on_error=on_error)


def load_pool(pools: list[Path], names: list[str]) -> list[dict]:
    """Pool rows with absolute chip paths and class ids; a row without taxon, a missing chip or a
    label outside the dataset's names is an error naming the manifest line."""
    items = []
    for pool in pools:
        man = Path(pool) / MANIFEST
        for i, row in read_pool_lines(pool, missing="an instance pool needs one"):
            if row.get("kept") is False:
                continue  # rejected by `synthgen filter`
            if not row.get("taxon"):
                raise SynthgenError(f"{man}:{i}: chip {row['file']!r} has no taxon")
            f = Path(pool) / row["file"]
            if not f.is_file():
                raise SynthgenError(f"{man}:{i}: chip file {f} not found")
            label = row.get("label")
            if label not in names:
                label = row["taxon"] if row["taxon"] in names else label
            if label not in names:
                raise SynthgenError(f"{man}:{i}: pool label {row.get('label')!r} (taxon {row['taxon']!r}) is not "
                                    f"in the dataset's names {names}")
            items.append({"pool": str(Path(pool).resolve()), "file": str(f.resolve()), "rel": row["file"],
                          "label": label, "taxon": row["taxon"], "cls": names.index(label)})
    if not items:
        raise SynthgenError(f"pools {[str(p) for p in pools]}: no usable instances")
    return items


def _body_lengths(cfg: ComposeConfig, items: list[dict]) -> dict[str, float]:
    """label -> body length (m): config overrides first, then the taxonomy's body_length_m."""
    out = dict(cfg.scale.body_length_m)
    tax = None
    if cfg.scale.taxonomy:
        from taxonomy import Taxonomy

        tax = Taxonomy.load(cfg.scale.taxonomy)
    for it in items:
        if it["label"] in out:
            continue
        t = tax.resolve(it["taxon"]) if tax is not None else None
        if t is None or not t.body_length_m:
            raise SynthgenError(f"physical scale needs a body length for {it['taxon']!r}: set scale.body_length_m "
                                f"or a scale.taxonomy file with body_length_m")
        out[it["label"]] = float(t.body_length_m)
    return out


# --- worker side ----------------------------------------------------------------------------------
_STATE: dict = {}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (prctl PR_SET_PDEATHSIG), so a kill -9
    of augment-dataset leaves no orphans writing on; a parent already gone means exit now."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(state: dict | None, parent: int | None = None) -> None:
    """Per-process setup: tie a pool worker's life to its parent's, then load the compose state."""
    if parent is not None:
        _die_with_parent(parent)
    if state is None:
        return
    _STATE.clear()
    _STATE.update(state)
    _STATE["aug"] = build_tile_aug(state["cfg"].tile_aug)
    cv2.setNumThreads(1)


@lru_cache(maxsize=512)
def _load_item(chip: str, mask: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chip RGB, alpha (float 0..1) and the mask's convex hull points (for rotated-box sizes)."""
    rgb = np.asarray(Image.open(chip).convert("RGB"))
    m = np.asarray(Image.open(mask).convert("L"))
    hull = cv2.convexHull(cv2.findNonZero((m > 127).astype(np.uint8))).reshape(-1, 2).astype(np.float32)
    return rgb, (m > 127).astype(np.float32), hull


def _rotated_extent(hull: np.ndarray, angle: float) -> tuple[float, float]:
    """Width/height of the box around the mask rotated by `angle` (pixel-edge extents)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    corners = np.concatenate([hull + d for d in ((0, 0), (1, 0), (0, 1), (1, 1))])
    x = corners[:, 0] * c + corners[:, 1] * s
    y = -corners[:, 0] * s + corners[:, 1] * c
    return float(x.max() - x.min()), float(y.max() - y.min())


def _tile_seed(seed: int, image_path: str, copy: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}|{Path(image_path).name}|{copy}".encode()).digest()[:8], "little")


def _read_tile(path: str) -> tuple[np.ndarray, dict | None, int]:
    """RGB tile, the raster profile for GeoTIFFs with a CRS (else None), and the JPEG quality; an
    unreadable file (truncated, corrupt, over PIL's pixel limit) is a SynthgenError naming it."""
    try:
        if Path(path).suffix.lower() in RASTER_EXT:
            import rasterio

            with rasterio.open(path) as src:
                if src.crs is not None and not src.transform.is_identity:
                    arr = src.read(indexes=[1, 2, 3] if src.count >= 3 else [1, 1, 1])
                    return np.ascontiguousarray(arr.transpose(1, 2, 0).astype(np.uint8)), dict(src.profile), 90
        img = Image.open(path)
        return np.array(img.convert("RGB")), None, estimate_jpeg_quality(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # rasterio's errors are OSErrors
        raise SynthgenError(f"{path}: cannot read background image ({e})") from None


def _alpha_polygon(a: np.ndarray, x: int, y: int) -> list[float]:
    """Outer contour of the pasted alpha (> 0.5) in tile pixels, for YOLO-seg / COCO segmentation."""
    cnts, _ = cv2.findContours((a > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(cnts, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, 0.7, True).reshape(-1, 2).astype(float) + 0.5
    if len(c) < 3:
        c = np.array([[0, 0], [a.shape[1], 0], [a.shape[1], a.shape[0]], [0, a.shape[0]]], float)
    return (c + [x, y]).ravel().round(2).tolist()


def _paste_instances(tile: np.ndarray, job: dict, rng: np.random.Generator, habitat, region, existing: list,
                     occupied: list, gsd: float | None) -> tuple[list, list, int]:
    """Paste pool instances (chip + mask) into `tile` in place: (pasted, provenance, skipped)."""
    st = _STATE
    cfg: ComposeConfig = st["cfg"]
    hc = cfg.habitat
    th, tw = tile.shape[:2]
    items = st["items"]
    pad = int(math.ceil(cfg.blend.feather_px)) + 2
    names = [m for m, w in cfg.blend.mix.items() if w > 0]
    weights = np.array([cfg.blend.mix[m] for m in names], float)
    pasted, prov, skipped = [], [], 0
    for _ in range(sample_count(cfg.count, rng)):
        it = items[rng.integers(len(items))]
        rgb, alpha, hull = _load_item(it["file"], it["mask"])
        hflip = bool(rng.random() < 0.5)
        vflip = bool(cfg.view == "nadir" and rng.random() < 0.5)
        max_rot = cfg.max_rotation_deg if cfg.view == "nadir" else 0.0
        angle = float(rng.uniform(-max_rot, max_rot)) if max_rot > 0 else 0.0
        ew, eh = _rotated_extent(hull, angle)
        if gsd is not None:
            hw, hh = _rotated_extent(hull, 0.0)
            scale = physical_length_px(st["body_lengths"][it["label"]], gsd, rng, cfg.scale.jitter) / max(hw, hh)
        else:  # a size drawn from the dataset's boxes (some fill a photo) is shrunk to fit this tile
            scale = min(st["sizes"].sample(it["label"], rng) / math.sqrt(ew * eh), 0.95 * tw / ew, 0.95 * th / eh)
        if ew * scale > tw or eh * scale > th:  # physical size (GSD) larger than the tile: the input is wrong
            raise SynthgenError(f"{job['image_path']}: tile {tw}x{th} is smaller than instance {it['file']} at "
                                f"scale {scale:.2f} ({ew * scale:.0f}x{eh * scale:.0f} px)")
        fg, a = transform_instance(rgb, alpha, scale, angle, hflip, vflip, pad)
        if a.size == 0 or not (a > 0.5).any():
            skipped += 1
            continue
        ys, xs = np.nonzero(a > 0.5)
        pbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        occ = np.array([b[:4] for b in existing] + [p["box"] for p in pasted] + occupied, float).reshape(-1, 4)
        pos = find_position(a, pbox, (th, tw), occ, habitat, cfg.max_overlap, hc.min_fraction,
                            cfg.placement_tries, rng, region)
        if pos is None:
            skipped += 1
            continue
        x, y = pos
        mode = str(rng.choice(names, p=weights / weights.sum()))
        used, mode = paste(tile, fg, a, x, y, mode, cfg.blend, rng)
        ys, xs = np.nonzero(used > 0.5)
        if not len(ys):
            skipped += 1
            continue
        box = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
        poly = _alpha_polygon(used, x, y)
        pasted.append({"box": box, "cls": it["cls"], "poly": poly})
        prov.append({"tile": job["out_rel"], "background": job["image_path"], "pool": it["pool"],
                     "pool_item": it["rel"], "label": it["label"], "taxon": it["taxon"], "x": x, "y": y,
                     "scale": round(scale, 4), "rotation": round(angle, 2), "hflip": hflip, "vflip": vflip,
                     "blend": mode, "mask_method": it["mask_method"], "box": box})
    return pasted, prov, skipped


def _paint_instances(tile: np.ndarray, job: dict, rng: np.random.Generator, habitat, region, existing: list,
                     occupied: list) -> tuple[np.ndarray, list, list, int]:
    """Paint animals into holes of `tile` with the in-context generator, placed by the same rules as
    pastes (habitat, no overlap, edge bands): (painted tile, pasted, provenance, skipped). The label is
    the animal's oriented box, drawn from the training labels' sizes, at any angle on nadir views."""
    import cv2

    from synthgen.incontext.generator import InContextGenerator, Placement, oriented_box
    from synthgen.incontext.windows import grow

    st = _STATE
    cfg: ComposeConfig = st["cfg"]
    if not isinstance(st["generator"], InContextGenerator):  # a path until this process first paints
        st["generator"] = InContextGenerator.from_pretrained(st["generator"], device=st["paint"].device)
    gen: InContextGenerator = st["generator"]
    th, tw = tile.shape[:2]
    placements, pasted, prov, skipped = [], [], [], 0
    for _ in range(sample_count(cfg.count, rng)):
        label, cls, taxon, lineage = st["paint_targets"][int(rng.integers(len(st["paint_targets"])))]
        shapes = gen.shapes[label]
        long, short = shapes[int(rng.integers(len(shapes)))]
        angle = float(rng.uniform(0, np.pi)) if cfg.view == "nadir" else 0.0
        corners = oriented_box((0.0, 0.0), long, short, angle)
        hole = grow(corners, gen.window.margin)
        lo = np.floor(hole.min(0)).astype(int)
        size = np.ceil(hole.max(0)).astype(int) - lo + 1
        a = np.zeros((size[1], size[0]), np.float32)  # the patch spans the hole; habitat is judged on the animal
        cv2.fillPoly(a, [np.round(corners - lo).astype(np.int32)], 1.0)
        occ = np.array([b[:4] for b in existing] + [p["box"] for p in pasted] + occupied, float).reshape(-1, 4)
        pos = find_position(a, (0, 0, size[0], size[1]), (th, tw), occ, habitat, cfg.max_overlap,
                            cfg.habitat.min_fraction, cfg.placement_tries, rng, region)
        if pos is None:
            skipped += 1
            continue
        c = corners - lo + np.asarray(pos)
        box = [float(max(c[:, 0].min(), 0)), float(max(c[:, 1].min(), 0)), float(min(c[:, 0].max(), tw)),
               float(min(c[:, 1].max(), th))]
        seed = int(rng.integers(2**63 - 1))
        placements.append(Placement(c, taxon, label, lineage, seed))
        pasted.append({"box": box, "cls": cls, "obb": np.round(c, 2).flatten().tolist()})
        prov.append({"tile": job["out_rel"], "background": job["image_path"], "pool": st["generator_path"],
                     "pool_item": None, "label": label, "taxon": taxon, "x": int(pos[0]), "y": int(pos[1]),
                     "rotation": round(float(np.degrees(angle)), 2), "seed": seed, "blend": "paint",
                     "mask_method": None, "box": box, "obb": np.round(c, 2).tolist()})
    if placements:
        tile, _ = gen.paint_tile(tile, placements, st["paint"])
    return tile, pasted, prov, skipped


def compose_tile(job: dict) -> dict:
    """Make one synthetic tile (job: background image, copy index, output stem, existing boxes);
    writes image + labels atomically and returns the manifest row and provenance rows."""
    st = _STATE
    cfg: ComposeConfig = st["cfg"]
    rng = np.random.default_rng(_tile_seed(cfg.seed, job["image_path"], job["copy"]))
    try:
        tile, profile, quality = _read_tile(job["image_path"])
    except SynthgenError as e:
        if st.get("on_error", "raise") == "raise":
            raise
        return {"row": None, "prov": [], "problem": {"file": job["image_path"], "line": None, "reason": str(e)}}
    th, tw = tile.shape[:2]
    region = uniform_edge_region(tile) if cfg.view == "ground" and cfg.exclude_edge_bands else None
    georef = (profile["transform"], profile["crs"]) if profile else None
    habitat = None
    hc = cfg.habitat
    if hc.kind == "color":
        habitat = color_habitat(tile, hc)
    elif hc.kind == "raster":
        habitat = raster_habitat(hc, job["image_path"], (th, tw), georef)
    elif hc.kind == "vector":
        habitat = vector_habitat(st["habitat_gdf"], job["image_path"], (th, tw), georef)
    existing = [list(b) for b in job["boxes"]] if cfg.keep_existing_labels else []
    occupied = [b[:4] for b in job["boxes"]]  # never paste over a real animal, even if its label is dropped
    if habitat is not None:
        habitat = habitat.copy()
        for x0, y0, x1, y1 in occupied:
            habitat[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 0
    gsd = None
    if cfg.scale.mode == "physical":
        if profile is None:
            raise SynthgenError(f"{job['image_path']}: not a GeoTIFF with a CRS, so physical scale (body length / "
                                "GSD) is impossible; use scale.mode: dataset")
        if profile["crs"].is_geographic:
            raise SynthgenError(f"{job['image_path']}: CRS is geographic (degrees); physical scale needs a projected "
                                "CRS in metres")
        gsd = gsd_from_transform(profile["transform"], job["image_path"])
    if st.get("generator") is not None:
        tile, pasted, prov, skipped = _paint_instances(tile, job, rng, habitat, region, existing, occupied)
    else:
        pasted, prov, skipped = _paste_instances(tile, job, rng, habitat, region, existing, occupied, gsd)
    row = {"output": job["out_rel"], "background": job["image_path"], "copy": job["copy"], "width": tw,
           "height": th, "geo": profile is not None, "n_pasted": len(pasted), "n_skipped": skipped,
           "real": [[*b[:5], b[5]] for b in existing], "pasted": pasted}
    if not pasted:  # nothing placed: the real tile again, not a synthetic one (recorded, so a rerun skips it)
        return {"row": {**row, "empty": True}, "prov": []}
    aug = st.get("aug")
    if aug is not None and profile is None:
        aug.set_random_seed(int(rng.integers(2**31)))
        tile = aug(image=tile)["image"]
    out_img = st["out"] / job["out_rel"]
    if profile is not None:
        _write_geotiff(tile, profile, out_img)
    else:
        _replace_write(out_img, jpeg_bytes(tile, cfg.tile_aug.jpeg_quality or quality))
    # labels: real boxes (OBB corners kept as polygons for seg) + pasted boxes/polygons. Where the
    # input's labels are polygons (OBB), labels/ holds polygons too (pasted boxes as rectangles): a
    # mix of polygon and box files makes ultralytics drop every segment with a warning
    det, seg, polygons = [], [], st.get("polygon_labels", False)
    for b in existing:
        c, obb = int(b[4]), b[5]
        pts = obb if obb is not None else box_corners(b[:4])
        det.append(polygon_line(c, pts, tw, th) if polygons else yolo_line(c, b[:4], tw, th))
        seg.append(polygon_line(c, pts, tw, th))
    for p in pasted:
        det.append(polygon_line(p["cls"], p.get("obb") or box_corners(p["box"]), tw, th) if polygons
                   else yolo_line(p["cls"], p["box"], tw, th))
        if "poly" in p:
            seg.append(polygon_line(p["cls"], p["poly"], tw, th))
    stem = Path(job["out_rel"]).with_suffix(".txt").name
    # a painted animal's hole is not its mask: no instance-seg labels where painting made the tile
    outputs = (("labels", det),) if st.get("generator") is not None else (("labels", det), ("labels-seg", seg))
    for sub, lines in outputs:
        _replace_write(st["out"] / sub / job["split"] / stem, "".join(line + "\n" for line in lines))
    return {"row": row, "prov": prov}


def _replace_write(path: Path, data: bytes | str) -> None:
    """Temp file + rename, without fsync: a killed process never leaves a torn file under the final
    name, and the fsynced manifest row (written after) decides whether the tile counts as done.
    Skipping fsync for the three per-tile files roughly halves the time per tile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _write_geotiff(tile: np.ndarray, profile: dict, path: Path) -> None:
    """Same grid and CRS as the source; written beside the target and renamed (atomic)."""
    import rasterio

    prof = {k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize", "tiled", "nodata")}
    prof.update(driver="GTiff", count=3, dtype="uint8", compress="lzw")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tif", dir=path.parent)
    os.close(fd)
    try:
        with rasterio.open(tmp, "w", **prof) as dst:
            dst.write(tile.transpose(2, 0, 1))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- driver ---------------------------------------------------------------------------------------
def _listed(image_list: str | Path) -> set[str]:
    """Real paths of an image list file (links and relative paths resolve to the same file)."""
    p = Path(image_list)
    if not p.is_file():
        raise SynthgenError(f"{p}: image list not found")
    return {os.path.realpath(p.parent / x.strip()) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()}


def _jobs(ds, cfg: ComposeConfig, image_list: Path | None, n_images: int | None) -> list[dict]:
    im = ds.images[ds.images.split.isin(cfg.background_splits)]
    if image_list is not None:
        wanted = _listed(image_list)
        im = im[im.image_path.map(lambda p: os.path.realpath(p) in wanted)]
    if im.empty:
        raise SynthgenError(f"{ds.root}: no background tiles in splits {cfg.background_splits}"
                            + (f" listed in {image_list}" if image_list else ""))
    names = ds.names
    by_img = {k: g for k, g in ds.boxes.groupby("image_path")} if len(ds.boxes) else {}
    # n_images larger than the tiles x copies: make more copies per tile (each with its own seed)
    copies = max(cfg.copies_per_tile, math.ceil(n_images / len(im)) if n_images else 0)
    jobs, seen = [], set()
    for r in im.sort_values("image_path").itertuples():
        g = by_img.get(r.image_path)
        boxes = []
        if g is not None:
            for b in g.itertuples():
                obb = None if b.obb is None or (isinstance(b.obb, float) and math.isnan(b.obb)) else list(b.obb)
                boxes.append([float(b.xmin), float(b.ymin), float(b.xmax), float(b.ymax), names.index(b.label), obb])
        src = Path(r.image_path)
        ext = ".tif" if src.suffix.lower() in RASTER_EXT else ".jpg"
        for k in range(copies):
            stem = f"{src.stem}__syn{k}"
            if stem in seen:
                stem = f"{src.stem}_{hashlib.sha1(str(src).encode()).hexdigest()[:6]}__syn{k}"
            seen.add(stem)
            jobs.append({"image_path": r.image_path, "copy": k, "split": "train", "boxes": boxes,
                         "out_rel": f"images/train/{stem}{ext}"})
    if n_images is not None and n_images < len(jobs):
        rng = np.random.default_rng(cfg.seed)
        jobs = [jobs[i] for i in sorted(rng.choice(len(jobs), n_images, replace=False))]
    return jobs


def _run(fn, args: list, workers: int, init_state: dict | None, desc: str):
    """Map `fn` over `args` in-process (workers <= 1) or with a process pool, in completion order."""
    if workers <= 1:
        _init_worker(init_state)
        for a in tqdm(args, desc=desc, unit="it", leave=False):
            yield fn(a)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(init_state, os.getpid())) as ex:
        futs = [ex.submit(fn, a) for a in args]
        for f in tqdm(futs, desc=desc, unit="it", leave=False):
            yield f.result()


def _mask_job(a: tuple) -> dict:
    return compute_mask_cached(*a)


def augment_dataset(dataset: str | Path, pools: str | Path | list, out: str | Path,
                    config: ComposeConfig | str | Path | None = None, image_list: str | Path | None = None,
                    n_images: int | None = None, seed: int | None = None, workers: int = 1,
                    preview: int = 0, on_error: str = "raise", generator: str | Path | None = None,
                    paint=None) -> AugmentResult:
    """Compose synthetic training tiles into `out` (a new folder; no input is written to): pool
    instances pasted, or with `generator` (an in-context model folder) animals painted into holes
    (`paint`: its PaintConfig). With on_error="skip" unreadable backgrounds are left out and listed
    in the result's `problems`."""
    if on_error not in ("raise", "skip"):
        raise SynthgenError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    cfg = config if isinstance(config, ComposeConfig) else (
        ComposeConfig.from_yaml(config) if config else ComposeConfig())
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    pools = [Path(p) for p in (pools if isinstance(pools, list | tuple) else [pools] if pools else [])]
    if bool(pools) == (generator is not None):
        raise SynthgenError("give either pools of instances to paste (--pool) or an in-context model to paint "
                            "with (--generator), not both or neither")
    inputs = [*pools, generator, image_list, None if isinstance(config, ComposeConfig) else config, cfg.habitat.path]
    refuse_inside_inputs(out, [*dataset_inputs(dataset), *inputs], "output dataset")  # before reading it
    ds = load_backgrounds(dataset, on_error)
    refuse_inside_inputs(out, [*dataset_inputs(dataset, ds.images.image_path), *inputs], "output dataset")
    out = Path(out).resolve()
    names = list(ds.names)
    if generator is not None:
        return _augment_painting(ds, names, Path(generator), paint, out, cfg, image_list, n_images, workers,
                                 preview, on_error)
    if not names:  # bare background tiles: the pools' labels are the classes
        names = sorted({str(r.get("label")) for p in pools for r in read_pool(p)})
    items = load_pool(pools, names)
    out.mkdir(parents=True, exist_ok=True)

    cache = out / "masks"
    recs = list(_run(_mask_job, [(Path(it["file"]), cache, cfg.mask) for it in items], workers, None, "masks"))
    good = []
    for it, rec in zip(items, recs, strict=True):
        if rec["mask"]:
            good.append({**it, "mask": rec["mask"], "mask_method": rec["method"]})
    n_rej = len(items) - len(good)
    methods: dict[str, int] = {}
    for rec in recs:
        methods[rec["method"]] = methods.get(rec["method"], 0) + 1
    write_json(cache / "summary.json", {"chips": len(recs), "by_method": methods,
                                         "rejected": [{"chip": r["chip"], "reason": r["reason"]}
                                                      for r in recs if not r["mask"]]})
    if not good:
        raise SynthgenError(f"every pool instance's mask was rejected (e.g. {recs[0]['chip']}: {recs[0]['reason']})")

    state = {"cfg": cfg, "items": good, "out": out, "on_error": on_error,
             "polygon_labels": bool(ds.boxes.obb.notna().any()) if len(ds.boxes) else False,
             "sizes": DatasetSizes(ds.boxes[ds.boxes.split.isin(cfg.background_splits)], cfg.scale.jitter,
                                   cfg.scale.size_px)}
    if cfg.scale.mode == "physical":
        state["body_lengths"] = _body_lengths(cfg, good)
    if cfg.habitat.kind == "vector":
        import geopandas as gpd

        state["habitat_gdf"] = gpd.read_file(cfg.habitat.path)
    if cfg.habitat.kind in ("raster", "vector") and not cfg.habitat.path:
        raise SynthgenError(f"habitat.kind {cfg.habitat.kind} needs habitat.path")

    res = _compose_all(ds, names, state, out, cfg, image_list, n_images, workers, preview)
    return AugmentResult(out, res["n_tiles"], res["n_pasted"], res["n_skipped"], n_rej, res["data_yaml"],
                         n_empty=res["n_empty"], pools=_pool_summary(pools, items, recs, read_jsonl(out / "provenance.jsonl")),
                         problems=[*ds.problems, *res["problems"]])


def _augment_painting(ds, names: list[str], generator: Path, paint, out: Path, cfg: ComposeConfig, image_list,
                      n_images, workers: int, preview: int, on_error: str) -> AugmentResult:
    """augment-dataset with an in-context model: the animals it knows that the dataset labels."""
    from synthgen.generator import read_index
    from synthgen.incontext.generator import PaintConfig

    kind = read_index(generator)["kind"]
    if kind != "incontext":
        raise SynthgenError(f"{generator}: a {kind!r} model draws whole chips; paint into tiles needs an "
                            "'incontext' model (or generate a pool and pass it with --pool)")
    counts = json.loads((generator / "taxon_counts.json").read_text(encoding="utf-8"))
    names = names or sorted({c.get("label") or t for t, c in counts.items()})
    targets = [(c.get("label") or t, names.index(c.get("label") or t), t, c["lineage"])
               for t, c in sorted(counts.items()) if (c.get("label") or t) in names]
    if not targets:
        raise SynthgenError(f"{generator}: paints {', '.join(sorted(counts))}, none of the dataset's classes "
                            f"({', '.join(names)})")
    out.mkdir(parents=True, exist_ok=True)
    state = {"cfg": cfg, "items": [], "out": out, "on_error": on_error, "generator": str(generator),
             "generator_path": str(generator.resolve()), "paint": paint or PaintConfig(), "paint_targets": targets,
             "polygon_labels": bool(ds.boxes.obb.notna().any()) if len(ds.boxes) else False}
    res = _compose_all(ds, names, state, out, cfg, image_list, n_images, workers, preview)
    painted = sum(1 for _ in read_jsonl(out / "provenance.jsonl"))
    return AugmentResult(out, res["n_tiles"], res["n_pasted"], res["n_skipped"], 0, res["data_yaml"],
                         n_empty=res["n_empty"], pools={str(generator): {"painted": painted}},
                         problems=[*ds.problems, *res["problems"]])


def _compose_all(ds, names: list[str], state: dict, out: Path, cfg: ComposeConfig, image_list, n_images,
                 workers: int, preview: int) -> dict:
    """Make every tile job not yet done (resumable), then labels, data.yaml and previews."""
    jobs = _jobs(ds, cfg, Path(image_list) if image_list else None, n_images)
    man_path, prov_path = out / "manifest.jsonl", out / "provenance.jsonl"
    done_rows = {r["output"]: r for r in read_jsonl(man_path)}
    prov_rows = [r for r in read_jsonl(prov_path) if r["tile"] in done_rows]
    write_jsonl(prov_path, prov_rows)  # drop provenance of tiles killed before their manifest row
    todo = [j for j in jobs if j["out_rel"] not in done_rows]
    # provenance is appended with a flush only (one write per tile, no fsync): the fsynced manifest row
    # that follows is the truth, and a rerun drops provenance rows of tiles missing from the manifest
    problems = []
    with JsonlAppender(man_path) as man, open(prov_path, "a", encoding="utf-8") as prov:
        for res in _run(compose_tile, todo, workers, state, "compose"):
            if res["row"] is None:  # unreadable background, on_error="skip": listed, retried by a rerun
                problems.append(res["problem"])
                continue
            prov.write("".join(json.dumps(p) + "\n" for p in res["prov"]))
            prov.flush()
            man.write(res["row"])
            done_rows[res["row"]["output"]] = res["row"]
    done = [done_rows[j["out_rel"]] for j in jobs if j["out_rel"] in done_rows]
    rows = [r for r in done if not r.get("empty")]
    data_yaml = _finalize(out, ds, rows, names, cfg, image_list)
    if preview:
        draw_previews(out, rows[:preview], names)
    return {"n_tiles": len(rows), "n_pasted": sum(r["n_pasted"] for r in rows), "data_yaml": data_yaml,
            "n_skipped": sum(r["n_skipped"] for r in done), "n_empty": len(done) - len(rows), "problems": problems}


def _reason_kind(reason: str) -> str:
    """A mask rejection reason without its measurements, for counting: the first method's reason."""
    first = reason.split("; ")[0].split(": ", 1)[-1]
    return re.sub(r"\s*\([^)]*\)", "", first)


def _pool_summary(pools: list[Path], items: list[dict], recs: list[dict], prov: list[dict]) -> dict[str, dict]:
    """Per pool: instances read, rows the filter rejected, masks rejected by reason, instances pasted."""
    pasted = Counter(r["pool"] for r in prov)
    out = {}
    for pool in pools:
        key = str(Path(pool).resolve())
        mine = [rec for it, rec in zip(items, recs, strict=True) if it["pool"] == key]
        out[str(pool)] = {
            "instances": len(mine),
            "filtered_out": sum(r.get("kept") is False for r in read_pool(pool)),
            "masks_rejected": dict(Counter(_reason_kind(r["reason"]) for r in mine if not r["mask"]).most_common()),
            "pasted": pasted[key]}
    return out


def _finalize(out: Path, ds, rows: list[dict], names: list[str], cfg: ComposeConfig, image_list) -> Path:
    """Lists, data.yaml, COCO JSON and (GeoTIFFs) the GeoPackage, all derived from the manifest."""
    synth = [str(out / r["output"]) for r in rows]
    real = ds.images[ds.images.split.isin(cfg.background_splits)].image_path.tolist()
    if image_list:
        wanted = _listed(image_list)
        real = [p for p in real if os.path.realpath(p) in wanted]
    lists = {"train_real": sorted(real), "train_synthetic": synth}
    for split in ("val", "test"):
        imgs = ds.images[ds.images.split == split].image_path.tolist()
        if imgs:
            lists[split] = sorted(imgs)
    for k, v in lists.items():
        with atomic_write(out / f"{k}.txt") as f:
            f.writelines(p + "\n" for p in v)
    splits = {"train": ["train_real.txt", "train_synthetic.txt"], **{s: f"{s}.txt" for s in ("val", "test") if s in lists}}
    save_data_yaml(out / "data.yaml", names, splits, out, train_real="train_real.txt",
                   train_synthetic="train_synthetic.txt", synthetic_ratio=cfg.synthetic_ratio,
                   counts={"train_real": len(real), "train_synthetic": len(synth)})
    _write_coco(out / "annotations" / "instances_train_synthetic.json", rows, names)
    if any(r["geo"] for r in rows):
        _write_gpkg(out / "boxes.gpkg", out, [r for r in rows if r["geo"]], names)
    return out / "data.yaml"


def _write_coco(path: Path, rows: list[dict], names: list[str]) -> None:
    """The composed tiles' boxes as COCO, each annotation marked synthetic (pasted) or real, with its polygon."""
    images, anns = [], []
    for i, r in enumerate(rows, 1):
        images.append(coco_image(i, r["output"], r["width"], r["height"]))
        for b in r["real"]:
            seg = [b[5]] if b[5] is not None else []
            anns.append(coco_annotation(len(anns) + 1, i, b[:4], int(b[4]), segmentation=seg, synthetic=False))
        for p in r["pasted"]:
            anns.append(coco_annotation(len(anns) + 1, i, p["box"], p["cls"], segmentation=[p.get("poly") or p["obb"]],
                                        synthetic=True))
    write_coco(path, images, anns, names)


def _write_gpkg(path: Path, out: Path, rows: list[dict], names: list[str]) -> None:
    """Boxes of the georeferenced outputs as polygons in the rasters' CRS (one GeoPackage)."""
    import geopandas as gpd

    from detection.geo import pixel_to_map_boxes, read_georef

    frames, crs = [], None
    for r in rows:
        g = read_georef(out / r["output"])
        if crs is not None and g.crs != crs:
            raise SynthgenError(f"{out / r['output']}: CRS {g.crs} differs from the other outputs' ({crs})")
        crs = g.crs
        boxes = [(b[:4], int(b[4]), False) for b in r["real"]] + [(p["box"], p["cls"], True) for p in r["pasted"]]
        if not boxes:
            continue
        geoms = pixel_to_map_boxes(np.array([b[0] for b in boxes], float), g.transform)
        frames.append(gpd.GeoDataFrame({"image_path": r["output"], "label": [names[b[1]] for b in boxes],
                                        "synthetic": [b[2] for b in boxes]}, geometry=geoms, crs=crs))
    gdf = pd.concat(frames, ignore_index=True) if frames else gpd.GeoDataFrame(
        {"image_path": [], "label": [], "synthetic": []}, geometry=[], crs=crs)
    fd, tmp = tempfile.mkstemp(prefix=".boxes.", suffix=".gpkg", dir=out)
    os.close(fd)
    os.unlink(tmp)
    try:
        gpd.GeoDataFrame(gdf, crs=crs).to_file(tmp, driver="GPKG", layer="boxes")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def draw_previews(out: Path, rows: list[dict], names: list[str]) -> list[Path]:
    """PNG per output: real boxes blue, pasted boxes green with their polygon in yellow."""
    from synthgen.io_utils import atomic_save_image

    paths = []
    for r in rows:
        img, _, _ = _read_tile(str(out / r["output"]))
        img = np.ascontiguousarray(img)
        for b in r["real"]:
            cv2.rectangle(img, (int(b[0]), int(b[1])), (int(math.ceil(b[2])) - 1, int(math.ceil(b[3])) - 1),
                          (60, 120, 255), 1)
        for p in r["pasted"]:
            pts = np.asarray(p.get("poly") or p["obb"], float).reshape(-1, 1, 2).round().astype(np.int32)
            cv2.polylines(img, [pts], True, (255, 230, 0), 1)
            x0, y0, x1, y1 = (round(v) for v in p["box"])  # painted boxes are the oriented box's float extent
            cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), 1)
            cv2.putText(img, names[p["cls"]], (x0, max(y0 - 3, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 0), 1)
        path = out / "previews" / (Path(r["output"]).stem + ".png")
        atomic_save_image(Image.fromarray(img), path)
        paths.append(path)
    return paths

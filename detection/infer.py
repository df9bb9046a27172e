"""Sliced (tiled) inference over large frames and GeoTIFFs, SAHI-style.

Animals in survey frames are a few dozen pixels in images of thousands: resizing the whole
frame to the detector's input size would erase them. We cut overlapping tiles at native
resolution, run them in batches, shift boxes back to frame coordinates and merge the duplicates
that the overlap creates at tile borders (greedy NMM by intersection-over-smaller, as SAHI does,
or class-aware NMS). GeoTIFFs are read window by window (rasterio), so rasters larger than memory
work, and their detections are also written as a GeoPackage in the raster's CRS.

Resumable: each finished image is appended to `OUT/predictions.jsonl`; a rerun skips those.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from detection.dataset import coco_annotation, coco_image, write_coco  # noqa: E402
from synthgen.device import autocast, resolve_device  # noqa: E402
from synthgen.errors import SynthgenError  # noqa: E402
from synthgen.io_utils import (  # noqa: E402
    JsonlAppender,
    atomic_save_image,
    atomic_write,
    read_jsonl,
    refuse_inside_inputs,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2"}
PRED_COLUMNS = ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
PREVIEW_SIDE = 1600  # px, longer side of the annotated previews (survey rasters can be 50k px)


class InferenceError(SynthgenError):
    """Model or source for `synthgen detect` is missing or unreadable."""


# ---------------------------------------------------------------------------------------------
# model
@dataclass
class LoadedDetector:
    model: torch.nn.Module
    names: dict[int, str]
    stride: int
    end2end: bool


_ACTIVATION = re.compile(r"(torch\.)?nn\.\w+\([\w\s.,=+-]*\)")  # what ultralytics evals: nn.SiLU(), nn.LeakyReLU(0.1)


def load_model(path: str | Path, device: torch.device, trust: bool = False) -> LoadedDetector:
    """Load a detector from an ultralytics .pt (unpickled without running code unless `trust`, see
    `detection.train.load_torch_checkpoint`) or from our .safetensors export (no unpickling)."""
    from detection.train import make_ultralytics_offline, trusted_checkpoints

    make_ultralytics_offline()
    path = Path(path)
    if not path.is_file():
        raise InferenceError(
            f"model {path} not found; inference runs offline: pass a local best.pt / best.safetensors "
            "from `synthgen train-detector`"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        from ultralytics.nn.tasks import DetectionModel

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "yaml" not in meta:
            raise InferenceError(f"{path}: no model yaml in the safetensors metadata (not a synthgen export)")
        names = {int(k): v for k, v in json.loads(meta["names"]).items()}
        yml = json.loads(meta["yaml"])
        if not _ACTIVATION.fullmatch(str(yml.get("activation", "nn.SiLU()")).strip()):  # ultralytics eval()s it
            raise InferenceError(f"{path}: model yaml activation {yml['activation']!r} is not a torch.nn layer")
        model = DetectionModel(yml, nc=len(names), verbose=False)
        model.load_state_dict(load_file(str(path)))
        model.names = names
    else:
        from ultralytics.nn.tasks import load_checkpoint

        try:
            with trusted_checkpoints(*([path] if trust else [])):
                model, _ = load_checkpoint(str(path), device="cpu")
        except SynthgenError:
            raise
        except Exception as e:  # a corrupt or foreign file: say which, in one line
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InferenceError(f"{path}: cannot load as an ultralytics checkpoint ({why})") from e
        names = {int(k): v for k, v in dict(model.names).items()}
    model = model.float().eval().to(device)
    return LoadedDetector(model, names, int(max(model.stride.max().item(), 32)), bool(getattr(model, "end2end", False)))


# ---------------------------------------------------------------------------------------------
# sources
@dataclass
class Frame:
    """One input image or raster; `read(x0, y0, w, h)` returns an HxWx3 uint8 window."""

    path: Path
    width: int
    height: int
    crs: str | None = None
    transform: tuple | None = None  # affine (a, b, c, d, e, f) pixel -> map

    def read(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if self.path.suffix.lower() in RASTER_SUFFIXES:
            import rasterio
            from rasterio.windows import Window

            with rasterio.open(self.path) as src:
                bands = list(range(1, min(src.count, 3) + 1))
                arr = src.read(bands, window=Window(x0, y0, w, h), boundless=False)
            arr = np.moveaxis(arr, 0, -1)
            if arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            if arr.dtype != np.uint8:  # e.g. uint16 reflectance: stretch to 8 bit for the detector
                a = arr.astype(np.float32)
                hi = np.percentile(a, 99.5) or 1.0
                arr = np.clip(a / hi * 255, 0, 255).astype(np.uint8)
            return arr
        return self._image()[y0 : y0 + h, x0 : x0 + w]

    def _image(self) -> np.ndarray:
        if not hasattr(self, "_cache"):
            from PIL import Image

            with Image.open(self.path) as im:
                self._cache = np.asarray(im.convert("RGB"))
        return self._cache


def open_frame(path: Path) -> Frame:
    """Inspect a source file: size, and CRS/transform for georeferenced rasters."""
    try:
        if path.suffix.lower() in RASTER_SUFFIXES:
            import rasterio

            with rasterio.open(path) as src:
                crs = src.crs.to_string() if src.crs else None
                t = tuple(src.transform)[:6] if src.crs else None
                return Frame(path, src.width, src.height, crs, t)
        from PIL import Image

        with Image.open(path) as im:
            return Frame(path, im.width, im.height)
    except Exception as e:
        raise InferenceError(f"{path}: cannot read image ({e})") from e


def list_sources(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InferenceError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        return files
    raise InferenceError(f"source {source} does not exist")


def tile_origins(size: int, tile: int, overlap: float) -> list[int]:
    """Tile start offsets along one axis: regular steps, the last tile flush with the edge."""
    if size <= tile:
        return [0]
    step = max(1, int(round(tile * (1 - overlap))))
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def iter_tiles(frame: Frame, tile: int, overlap: float) -> Iterator[tuple[int, int, np.ndarray]]:
    for y0 in tile_origins(frame.height, tile, overlap):
        for x0 in tile_origins(frame.width, tile, overlap):
            w, h = min(tile, frame.width - x0), min(tile, frame.height - y0)
            yield x0, y0, frame.read(x0, y0, w, h)


# ---------------------------------------------------------------------------------------------
# merging
def _ios(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    a = (box[2:] - box[:2]).prod()
    b = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    return inter / np.maximum(np.minimum(a, b), 1e-9)


def merge_detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, method: Literal["nmm", "nms"] = "nmm",
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge duplicates from overlapping tiles, per class.

    nms: torchvision NMS at IoU `threshold` (keeps the best box).
    nmm: greedy non-maximum merging: the best box absorbs every same-class box whose
    intersection over the smaller box is >= `threshold` and grows to their union (an animal cut
    by a tile border is half a box in one tile and whole in the next)."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4), scores, classes
    if method == "nms":
        import torchvision

        keep = torchvision.ops.batched_nms(
            torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
            torch.as_tensor(classes), threshold,
        ).numpy()
        return boxes[keep], scores[keep], classes[keep]
    if method != "nmm":
        raise InferenceError(f"unknown merge method {method!r}: use 'nmm' or 'nms'")
    out_b, out_s, out_c = [], [], []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        idx = idx[np.argsort(-scores[idx], kind="mergesort")]
        alive = np.ones(len(idx), dtype=bool)
        for i in range(len(idx)):
            if not alive[i]:
                continue
            b = boxes[idx[i]].copy()
            rest = np.flatnonzero(alive[i + 1 :]) + i + 1
            if len(rest):
                hit = rest[_ios(b, boxes[idx[rest]]) >= threshold]
                if len(hit):
                    grp = boxes[idx[hit]]
                    b = np.concatenate([np.minimum(b[:2], grp[:, :2].min(0)), np.maximum(b[2:], grp[:, 2:].max(0))])
                    alive[hit] = False
            out_b.append(b)
            out_s.append(scores[idx[i]])
            out_c.append(c)
    return np.array(out_b).reshape(-1, 4), np.array(out_s), np.array(out_c)


# ---------------------------------------------------------------------------------------------
# inference
@dataclass
class SliceConfig:
    tile: int = 640
    overlap: float = 0.2
    batch: int = 8
    conf: float = 0.25
    iou: float = 0.5  # NMS inside a tile
    merge: Literal["nmm", "nms"] = "nmm"
    merge_threshold: float = 0.5
    max_det: int = 1000  # per frame after merging


def _letterbox(tiles: list[np.ndarray], size: int) -> torch.Tensor:
    """Pad (never resize) tiles to size x size with ultralytics' grey, CHW float in [0, 1]."""
    batch = np.full((len(tiles), size, size, 3), 114, dtype=np.uint8)
    for i, t in enumerate(tiles):
        batch[i, : t.shape[0], : t.shape[1]] = t
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict_frame(det: LoadedDetector, frame: Frame, cfg: SliceConfig, device: torch.device) -> pd.DataFrame:
    """Tiles -> batched forward -> per-tile NMS -> shift -> merge. Boxes in frame pixels."""
    from ultralytics.utils.nms import non_max_suppression

    size = int(np.ceil(cfg.tile / det.stride) * det.stride)
    boxes, scores, classes = [], [], []
    pending: list[tuple[int, int, np.ndarray]] = []

    def flush() -> None:
        x = _letterbox([t for _, _, t in pending], size).to(device)
        with autocast(device):
            raw = det.model(x)
        out = non_max_suppression(raw, cfg.conf, cfg.iou, max_det=cfg.max_det, end2end=det.end2end)
        for (x0, y0, t), o in zip(pending, out, strict=True):
            o = o.float().cpu().numpy()
            if len(o) == 0:
                continue
            b = o[:, :4].copy()
            b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, t.shape[1]) + x0
            b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, t.shape[0]) + y0
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            boxes.append(b[ok])
            scores.append(o[ok, 4])
            classes.append(o[ok, 5].astype(int))
        pending.clear()

    for item in iter_tiles(frame, cfg.tile, cfg.overlap):
        pending.append(item)
        if len(pending) == cfg.batch:
            flush()
    if pending:
        flush()
    if boxes:
        b, s, c = merge_detections(
            np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes), cfg.merge, cfg.merge_threshold
        )
        order = np.argsort(-s, kind="mergesort")[: cfg.max_det]
        b, s, c = b[order], s[order], c[order]
    else:
        b, s, c = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)
    return pd.DataFrame(
        {
            "image_path": str(frame.path.resolve()),
            "xmin": b[:, 0], "ymin": b[:, 1], "xmax": b[:, 2], "ymax": b[:, 3],
            "label": [det.names.get(int(k), str(int(k))) for k in c],
            "score": s.astype(float),
        },
        columns=PRED_COLUMNS,
    )


def pixel_to_map(transform: tuple, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine (a, b, c, d, e, f) as in rasterio: X = a*x + b*y + c, Y = d*x + e*y + f."""
    a, b, c, d, e, f = transform
    return a * x + b * y + c, d * x + e * y + f


def _write_gpkg(df: pd.DataFrame, frame: Frame, path: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import Polygon

    geoms = []
    for r in df.itertuples():
        xs = np.array([r.xmin, r.xmax, r.xmax, r.xmin])
        ys = np.array([r.ymin, r.ymin, r.ymax, r.ymax])
        mx, my = pixel_to_map(frame.transform, xs, ys)
        geoms.append(Polygon(zip(mx, my, strict=True)))
    gdf = gpd.GeoDataFrame(df.reset_index(drop=True), geometry=geoms, crs=frame.crs)
    tmp = path.with_name(f".{path.name}.tmp.gpkg")
    tmp.unlink(missing_ok=True)
    gdf.to_file(tmp, driver="GPKG", layer="detections")
    os.replace(tmp, path)


def write_coco_predictions(df: pd.DataFrame, frames: list[Frame], names: dict[int, str], path: Path) -> None:
    """COCO detection results plus the image and category tables (one self-contained file)."""
    cat_id = {v: k for k, v in names.items()}
    img_id = {str(f.path.resolve()): i for i, f in enumerate(frames, 1)}
    images = [coco_image(i, p, f.width, f.height) for (p, i), f in zip(img_id.items(), frames, strict=True)]
    anns = [coco_annotation(j, img_id[r.image_path], (r.xmin, r.ymin, r.xmax, r.ymax), cat_id.get(r.label, -1),
                            score=r.score) for j, r in enumerate(df.itertuples(), 1)]
    write_coco(path, images, anns, names)


def draw_preview(df: pd.DataFrame, frame: Frame, path: Path, max_side: int = PREVIEW_SIDE) -> Path:
    """The frame (downscaled to `max_side`) with its detections drawn: label and score over each box."""
    from PIL import Image, ImageDraw

    s = min(1.0, max_side / max(frame.width, frame.height))
    w, h = max(1, round(frame.width * s)), max(1, round(frame.height * s))
    if frame.path.suffix.lower() in RASTER_SUFFIXES:
        import rasterio
        from rasterio.enums import Resampling

        with rasterio.open(frame.path) as src:
            arr = src.read(list(range(1, min(src.count, 3) + 1)), out_shape=(min(src.count, 3), h, w),
                           resampling=Resampling.average)
        arr = np.moveaxis(arr, 0, -1)
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
        if arr.dtype != np.uint8:
            arr = np.clip(arr / (np.percentile(arr, 99.5) or 1.0) * 255, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    else:
        img = Image.fromarray(frame._image()).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for r in df.itertuples():
        x0, y0, x1, y1 = (v * s for v in (r.xmin, r.ymin, r.xmax, r.ymax))
        draw.rectangle((x0, y0, x1, y1), outline=(255, 40, 40), width=2)
        draw.text((x0 + 2, max(y0 - 11, 0)), f"{r.label} {r.score:.2f}", fill=(255, 255, 0))
    atomic_save_image(img, path, quality=90)
    return path


def detect(
    model: str | Path, source: str | Path, out_dir: str | Path, cfg: SliceConfig | None = None,
    device: str = "auto", progress: bool = True, trust_checkpoint: bool = False,
) -> dict:
    """Run sliced inference on a file or folder; writes predictions.csv, predictions.coco.json,
    an annotated preview per image under `previews/` and, for georeferenced rasters, `<stem>.gpkg`
    (`no_crs` lists rasters without a CRS, which get none). Returns a summary dict with the outputs."""
    from tqdm.auto import tqdm

    refuse_inside_inputs(out_dir, [source, model], "detect output folder")
    cfg = cfg or SliceConfig()
    if not 0 <= cfg.overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1), got {cfg.overlap}")
    dev = resolve_device(device)
    det = load_model(model, dev, trust=trust_checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = [open_frame(p) for p in list_sources(source)]
    journal = out_dir / "predictions.jsonl"
    done = {r["image_path"] for r in read_jsonl(journal)}
    with JsonlAppender(journal) as app:
        for f in tqdm(frames, desc="detect", disable=not progress):
            key = str(f.path.resolve())
            if key in done:
                continue
            df = predict_frame(det, f, cfg, dev)
            app.write({"image_path": key, "boxes": df.drop(columns="image_path").to_dict("records")})
    rows = {r["image_path"]: r["boxes"] for r in read_jsonl(journal)}
    df = pd.DataFrame(
        [{"image_path": p, **b} for f in frames for p in [str(f.path.resolve())] for b in rows.get(p, [])],
        columns=PRED_COLUMNS,
    )
    with atomic_write(out_dir / "predictions.csv") as fh:
        df.to_csv(fh, index=False)
    write_coco_predictions(df, frames, det.names, out_dir / "predictions.coco.json")
    gpkgs, no_crs, previews = [], [], []
    for f in frames:
        mine = df[df.image_path == str(f.path.resolve())]
        if f.crs and f.transform:
            g = out_dir / f"{f.path.stem}.gpkg"
            _write_gpkg(mine, f, g)
            gpkgs.append(str(g))
        elif f.path.suffix.lower() in RASTER_SUFFIXES:
            no_crs.append(str(f.path))
        stem = f.path.stem if f.path.stem not in {Path(q).stem for q in previews} else f"{f.path.stem}_{len(previews)}"
        previews.append(str(draw_preview(mine, f, out_dir / "previews" / f"{stem}.jpg")))
    return {"images": len(frames), "detections": len(df), "csv": str(out_dir / "predictions.csv"),
            "coco": str(out_dir / "predictions.coco.json"), "gpkg": gpkgs, "no_crs": no_crs,
            "previews": previews, "out": str(out_dir)}

"""Training images for the latent backend: a chips folder (manifest.jsonl) or a plain image folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from synthgen.errors import SynthgenError
from synthgen.pool import MANIFEST, read_pool

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
RANK_ORDER = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def load_rows(data_dir: Path, split: str, taxon: str | None = None, label: str | None = None) -> list[dict]:
    """Chips manifest rows of `split` (optionally one taxon); an image folder gives rows for every image."""
    manifest = data_dir / MANIFEST
    if manifest.is_file():
        rows = [r for r in read_pool(data_dir) if r.get("split", split) == split]
        if taxon:
            rows = [r for r in rows if taxon.lower() in {str(r.get("taxon", "")).lower(), str(r.get("label", "")).lower()}]
        if not rows:
            raise SynthgenError(f"{manifest}: no rows with split={split!r}" + (f" and taxon {taxon!r}" if taxon else ""))
        return rows
    if not data_dir.is_dir():
        raise SynthgenError(f"{data_dir}: training data folder not found")
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SynthgenError(f"{data_dir}: no manifest.jsonl and no images found")
    return [{"file": str(p.relative_to(data_dir)), "label": label or taxon, "taxon": taxon, "lineage": {}}
            for p in files]


def resolve_levels(rows: list[dict], data_dir: Path, wanted: list[str] | None) -> list[str]:
    """Encoding levels, coarse to fine: the chips' taxonomy.json when readable, else the lineage keys."""
    levels: list[str] = []
    tax_file = data_dir / "taxonomy.json"
    if tax_file.is_file():
        try:
            from taxonomy import Taxonomy

            levels = list(Taxonomy.load(tax_file).levels)
        except (ImportError, AttributeError):
            levels = []
    if not levels:
        seen: dict[str, None] = {}
        for r in rows:
            for k in (r.get("lineage") or {}):
                seen.setdefault(k, None)
        known = [lv for lv in RANK_ORDER if lv in seen]
        levels = known + [lv for lv in seen if lv not in known]
    if wanted:
        missing = [lv for lv in wanted if lv not in levels]
        if missing:
            raise SynthgenError(f"{data_dir}: levels {missing} not in the data's taxonomy levels {levels}")
        levels = [lv for lv in levels if lv in wanted]
    if not levels:
        raise SynthgenError(f"{data_dir / 'manifest.jsonl'}: rows carry no 'lineage'; taxonomy conditioning needs it")
    return levels


def taxa_table(rows: list[dict]) -> dict[str, dict]:
    """taxon -> {label, lineage, count}: the pixel backend's taxon_counts.json, which generation resolves against."""
    table: dict[str, dict] = {}
    for r in rows:
        name = r.get("taxon") or r.get("label")
        if not name:
            continue
        entry = table.setdefault(name, {"label": r.get("label"), "lineage": r.get("lineage") or {}, "count": 0})
        entry["count"] += 1
    return table


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, centre-crop, scale to [-1, 1] (3, H, W)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (OSError, UnidentifiedImageError) as e:
        raise SynthgenError(f"{path}: cannot read image ({e})") from e
    return torch.from_numpy(arr).permute(2, 0, 1)


class ImageRows(torch.utils.data.Dataset):
    """Rows -> (image tensor, row index); horizontal flips as augmentation."""

    def __init__(self, data_dir: Path, rows: list[dict], resolution: int, hflip: bool):
        self.data_dir, self.rows, self.resolution, self.hflip = data_dir, rows, resolution, hflip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = load_image(self.data_dir / self.rows[i]["file"], self.resolution)
        if self.hflip and random.random() < 0.5:
            x = x.flip(-1)
        return x, i


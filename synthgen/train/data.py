"""Chips folder -> in-memory uint8 tensor + lineages (chips are small; this avoids loader overhead)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.augment import flip_rotate
from synthgen.errors import SynthgenError
from synthgen.pool import MANIFEST, read_pool_lines


@dataclass
class ChipSet:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    lineages: list[dict[str, str]]
    taxa: list[str]
    labels: list[str]
    root: Path
    context_channels: int = 0  # a chip is drawn whole: no extra input

    def batch(self, idx: torch.Tensor, g: torch.Generator, dihedral: bool, hflip: bool
              ) -> tuple[torch.Tensor, None, None]:
        """(x0 in [-1, 1], no context, no loss mask) under the configured flips."""
        return flip_rotate(self.images[idx].float().div(127.5).sub(1.0), g, dihedral, hflip), None, None


def load_chips(folder: str | Path, size: int, split: str | None = "train") -> ChipSet:
    """Read a chips/pool folder (manifest.jsonl with file, taxon, lineage) resized to size x size."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    rows: list[tuple[int, dict]] = []
    for i, row in read_pool_lines(folder, missing="make chips with `synthgen data chips`"):
        if not (row.get("taxon") or row.get("label")):
            raise SynthgenError(f"{manifest}:{i}: row lacks taxon and label")
        if not split or row.get("split", split) == split:
            rows.append((i, row | {"taxon": row.get("taxon") or row["label"]}))
    imgs, lineages, taxa, labels = [], [], [], []
    for i, row in rows:  # every row is checked before any image is read
        path = folder / row["file"]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                imgs.append(np.asarray(im))
        except OSError as e:
            raise SynthgenError(f"{manifest}:{i}: cannot read image {path} ({e})") from e
        lineage = row.get("lineage") or {"taxon": row["taxon"]}
        lineages.append({k: v for k, v in lineage.items() if v})
        taxa.append(row["taxon"])
        labels.append(row.get("label", row["taxon"]))
    if not imgs:
        raise SynthgenError(f"{manifest}: no chips{f' in split {split!r}' if split else ''}")
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return ChipSet(images, lineages, taxa, labels, folder)

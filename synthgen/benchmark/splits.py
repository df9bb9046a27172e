"""Group-aware splits and seeded, taxon-stratified real-data fractions.

Related images (augmented copies of one tile, frames of one sequence) must land in the same
split, or the test score measures memory. Fractions are drawn by group and stratified by each
group's rarest taxon, so a 10% subset still contains the rare taxa; for one seed the subsets are
nested (10% inside 25% inside 100%), which makes the curve over fractions less noisy.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from detection.dataset import group_ids


def tile_and_frame_ids(image_paths: Sequence[str], tile: str | None, frame: str | None) -> tuple[list[str], list[str]]:
    """(source tile id, source frame id) per image; an image whose name carries no frame is its own
    frame (its tile id), so grouping by frame never merges unrelated images."""
    tiles = group_ids(image_paths, tile)
    if not frame:
        return tiles, tiles
    rx = re.compile(frame, re.IGNORECASE)
    frames = []
    for p, t in zip(image_paths, tiles, strict=True):
        m = rx.search(Path(p).name)
        frames.append(f"frame:{m.group(1)}" if m else t)
    return tiles, frames


def _strata(images: pd.DataFrame, boxes: pd.DataFrame) -> pd.Series:
    """Stratum per group: its rarest label (by number of groups holding it); '' for negatives."""
    lab = boxes.merge(images[["image_path", "group"]], on="image_path")[["group", "label"]].drop_duplicates()
    freq = lab.label.value_counts()
    lab = lab.assign(freq=lab.label.map(freq)).sort_values(["freq", "label"])
    rare = lab.groupby("group").label.first()
    return pd.Series(images.group.unique()).map(lambda g: rare.get(g, "")).set_axis(images.group.unique())


def _perm(keys: list[str], seed: int) -> list[str]:
    """Seeded order that does not depend on the order the keys arrive in."""
    keys = sorted(keys)
    return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]


def split_by_group(images: pd.DataFrame, boxes: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """'train' / 'val' per image: whole groups, stratified, val about `val_fraction` of groups."""
    strata = _strata(images, boxes)
    val: set[str] = set()
    for s in sorted(strata.unique()):
        groups = _perm(list(strata.index[strata == s]), seed + zlib.crc32(s.encode()))
        k = int(round(val_fraction * len(groups)))
        if len(groups) >= 2:
            k = min(max(k, 1), len(groups) - 1)  # every stratum on both sides when possible
        val.update(groups[:k])
    return images.group.map(lambda g: "val" if g in val else "train")


def draw_fraction(images: pd.DataFrame, boxes: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """Image paths of a seeded, group-aware, taxon-stratified `fraction` of `images`.

    Per stratum, the first ceil(fraction * n_groups) groups of a seeded permutation (at least one
    while fraction > 0); the same seed gives nested subsets across fractions."""
    strata = _strata(images, boxes)
    chosen: set[str] = set()
    for s in sorted(strata.unique()):
        groups = _perm(list(strata.index[strata == s]), seed * 1_000_003 + zlib.crc32(s.encode()))
        k = len(groups) if fraction >= 1 else max(1, int(np.ceil(fraction * len(groups) - 1e-9)))
        chosen.update(groups[:k])
    return sorted(images.image_path[images.group.isin(chosen)])

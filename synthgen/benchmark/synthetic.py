"""Adapters from the benchmark to the synthetic-data stages owned by other modules.

Each adapter turns one cell's real training subset into a folder holding `train_synthetic.txt`
(composed tiles with YOLO labels beside them), via the library functions of chips (detection),
generator training (synthgen.train), generation (synthgen.pipelines), filtering (synthgen.filter)
and composition (synthgen.compose). If one of those is not importable the stage raises
`StageUnavailable` with the reason; the pipeline records the arm as not run and the report says
so, instead of silently reporting fewer arms.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from synthgen.errors import SynthgenError


class StageUnavailable(SynthgenError):
    """A pipeline stage's library function is not available in this installation."""


def _fn(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise StageUnavailable(f"{module}.{name} is not available ({e})") from e


def chips(train_list: Path, data_yaml: Path, out: Path, taxonomy: str | None, **kw: Any) -> Path:
    """Real instance chips from the cell's training images only (the generator never sees others)."""
    extract = _fn("detection.chips", "extract_chips")
    extract(data_yaml, out, image_list=train_list, taxonomy=taxonomy, **kw)
    return out


def train_generator(chips_dir: Path, out: Path, **kw: Any) -> Path:
    return Path(_fn("synthgen.train", "train_generator")(chips_dir, out, **kw))


def generate(model_dir: Path, chips_dir: Path, out: Path, **kw: Any) -> Path:
    return Path(_fn("synthgen.pipelines", "generate_pool")(model_dir, out, reference=chips_dir, **kw))


def filter_pool(pool: Path, out: Path, **kw: Any) -> Path:
    return Path(_fn("synthgen.filter", "filter_pool")(pool, out, **kw))


def compose(pool: Path, data_yaml: Path, train_list: Path, out: Path, n_images: int, seed: int, **kw: Any) -> Path:
    """Paste pool instances into the cell's real training tiles; returns the synthetic image list."""
    augment = _fn("synthgen.compose", "augment_dataset")
    augment(data_yaml, pool, out, image_list=train_list, n_images=n_images, seed=seed, **kw)
    lst = out / "train_synthetic.txt"
    if not lst.is_file():
        raise SynthgenError(f"{out}: augment-dataset wrote no train_synthetic.txt")
    return lst

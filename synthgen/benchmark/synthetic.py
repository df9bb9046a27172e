"""Adapters from the benchmark to the synthetic-data stages owned by other modules.

Each adapter turns one cell's real training subset into a folder holding `train_synthetic.txt`
(composed tiles with YOLO labels beside them), via the library functions of chips (detection),
generator training (synthgen.train), generation (synthgen.pipelines), filtering (synthgen.filter,
with a judge trained on the cell's own real chips) and composition (synthgen.compose), imported
plainly. A stage that cannot give its arm an input raises `StageUnavailable` with the reason; the
pipeline records the arm as not run and the report says so, instead of silently reporting fewer arms.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from detection import read_dataset
from detection.chips import ChipConfig, make_background_chips, make_chips
from synthgen import filter as filt
from synthgen import scoring
from synthgen.compose.config import ComposeConfig
from synthgen.compose.pipeline import augment_dataset
from synthgen.errors import SynthgenError
from synthgen.pipelines.generate import GenerateConfig
from synthgen.pipelines.generate import generate as generate_pool
from synthgen.train.config import TrainConfig
from synthgen.train.trainer import train as train_model


class StageUnavailable(SynthgenError):
    """A pipeline stage cannot give its arm an input (the filter kept nothing; augment-dataset does
    not take an in-context generator yet)."""


def chips(dataset: str, train_images: list[str], out: Path, taxonomy: str | None, progress: bool = False,
          **kw: Any) -> Path:
    """Real instance chips from the cell's training images only (the generator never sees others)."""
    ds = read_dataset(dataset).subset(images=train_images)
    make_chips(ds, out, cfg=ChipConfig(**kw), taxonomy=taxonomy, split=None, progress=progress)
    return out


def generator_config(seed: int, **kw: Any):
    """The resolved TrainConfig of a cell's generator: its hash keys the stage, so a changed default
    (e.g. the prediction type) retrains instead of reusing a stale generator."""
    return TrainConfig(**({"seed": seed} | kw))


def train_generator(chips_dir: Path, out: Path, seed: int, progress: bool = False, **kw: Any) -> Path:
    """The diffusion generator, trained on this cell's chips only (synthgen.train)."""
    train_model(generator_config(seed, **kw), out, chips=chips_dir, progress=progress)
    return out


def generate(model_dir: Path, out: Path, seed: int, n: int = 200, query: str = "Animalia", progress: bool = False,
             **kw: Any) -> Path:
    """`n` instances of every trained taxon under `query`, weighted by training counts."""
    generate_pool(model_dir, query, n, out, GenerateConfig(**({"seed": seed} | kw)), progress=progress)
    return out


def _reference_chips(chips_dir: Path, out: Path, val_fraction: float) -> Path:
    """The cell's chips as a reference pool with a held-out part for calibration, split by source
    image (chips of one tile stay on one side); files point back into `chips_dir`, nothing is copied."""
    import hashlib

    from synthgen.io_utils import write_jsonl
    from synthgen.pool import read_pool

    rows = read_pool(chips_dir)

    def held_out(src: str) -> bool:
        return int(hashlib.sha1(src.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction

    ref = [r | {"file": str((chips_dir / r["file"]).resolve()),
                "split": "val" if held_out(r.get("source_image", r["file"])) else "train"} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "manifest.jsonl", ref)
    return out


def _background_chips(dataset: str, train_images: list[str], chips_dir: Path, out: Path, seed: int,
                      val_fraction: float) -> Path:
    """As many background chips as the cell has animal chips, cut like them from the cell's training
    images only, held out by the same source-image hash as the animal reference."""
    import json

    settings = json.loads((chips_dir / "chips.json").read_text(encoding="utf-8"))
    cfg = ChipConfig(**({k: v for k, v in settings.items() if k in ChipConfig.model_fields} | {"seed": seed}))
    ds = read_dataset(dataset).subset(images=train_images)
    make_background_chips(ds, out / "background_chips", None, cfg, split=None, progress=False)
    return _reference_chips(out / "background_chips", out / "background", val_fraction)


def _judge_config(seed: int, judge: dict | None) -> Any:
    """The cell's JudgeConfig: the cell's seed unless the config names one."""
    return scoring.JudgeConfig(**({"seed": seed} | (judge or {})))


def filter_config(seed: int, scorer: str = "judge", judge: dict | None = None, val_fraction: float = 0.2,
                  background: bool | None = None, **kw: Any) -> dict:
    """A cell's resolved filter settings (FilterConfig and JudgeConfig with their defaults): their hash keys
    the stage, so a changed default (e.g. the near-copy bar) refilters instead of reusing stale picks."""
    return {"scorer": scorer, "judge": _judge_config(seed, judge).model_dump(mode="json"), "val_fraction": val_fraction,
            "background": background,
            "filter": filt.FilterConfig(**kw).model_dump(mode="json")}


def filter_generated(pool: Path, chips_dir: Path, out: Path, seed: int, scorer: str = "judge",
                     judge: dict | None = None, val_fraction: float = 0.2, background: bool | None = None,
                     dataset: str | None = None, train_images: list[str] | None = None, **kw: Any) -> Path:
    """Keep generated chips that pass `synthgen filter`; the judge (default) trains on this cell's
    real chips only, and calibrated thresholds come from its held-out part. With `background` (None:
    when the cell has one taxon, where taxon heads alone pass anything), the judge also learns animal
    vs background (score `p_animal`) from background chips of the cell's `train_images` of `dataset`.
    Returns the kept pool; an empty one makes the arm unavailable."""
    ref = _reference_chips(chips_dir, out / "reference", val_fraction)
    if scorer == "judge":
        bg = None
        if background is None:
            background = len({r["taxon"] for r in scoring.Pool.load(ref).rows}) == 1
        if background:
            if dataset is None or train_images is None:
                raise SynthgenError("filter background chips need the cell's dataset and training images")
            bg = _background_chips(dataset, train_images, chips_dir, out, seed, val_fraction)
        scoring.train_judge(ref, out / "judge", _judge_config(seed, judge), background=bg)
        sc = scoring.JudgeScorer(out / "judge")
    else:
        sc = scoring.load_scorer(scorer, scoring.TaxonSpace.from_rows(scoring.Pool.load(ref).rows))
    summary = filt.filter_pool(pool, sc, out / "kept", filt.FilterConfig(**kw), reference=ref)
    if not summary["kept"]:
        raise StageUnavailable(f"filter ({summary['score']}) kept none of the {summary['n']} generated instances "
                               f"in {pool}; see {out / 'kept' / 'filter_summary.json'}")
    return out / "kept"


def _compose_config(kw: dict[str, Any]) -> ComposeConfig | str | None:
    """A compose YAML (`config: FILE`) as the base, other keys overriding its fields."""
    kw = dict(kw)
    cfg = kw.pop("config", None)
    if kw:
        base = ComposeConfig.from_yaml(cfg) if cfg else ComposeConfig()
        cfg = ComposeConfig(**(base.model_dump() | kw))
    return cfg


def _synthetic_list(out: Path) -> Path:
    lst = out / "train_synthetic.txt"
    if not lst.is_file():
        raise SynthgenError(f"{out}: augment-dataset wrote no train_synthetic.txt")
    return lst


def compose(dataset: str, pool: Path, train_list: Path, out: Path, n_images: int, seed: int, **kw: Any) -> Path:
    """Paste pool instances into the cell's real training tiles; returns the synthetic image list."""
    augment_dataset(dataset, pool, out, config=_compose_config(kw), image_list=train_list, n_images=n_images,
                    seed=seed)
    return _synthetic_list(out)


def paint(dataset: str, model: str, train_list: Path, out: Path, n_images: int, seed: int, **kw: Any) -> Path:
    """Real tiles with animals painted in by an in-context generator: the same augment-dataset call
    as `compose`, given `generator=model` (config key `arms.incontext.model`) and no instance pool."""
    if "generator" not in inspect.signature(augment_dataset).parameters:
        raise StageUnavailable(f"synthgen.compose.pipeline.augment_dataset does not take an in-context generator "
                               f"yet (arms.incontext.model = {model})")
    augment_dataset(dataset, [], out, config=_compose_config(kw), image_list=train_list, n_images=n_images,
                    seed=seed, generator=model)
    return _synthetic_list(out)

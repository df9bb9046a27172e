"""Typed benchmark config: one YAML per dataset, with named scales (smoke, cpu, gpu, ...).

Every path in the file (dataset, taxonomy, compose config, an in-context generator, a detector
`.pt`) is relative to the config file, so a config means the same from any working folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detection.train import DetectorTrainConfig
from synthgen.config import load_yaml_mapping
from synthgen.errors import ConfigError

# arm id -> description. Ids are what results.json and the report use; order is the report's.
ARMS: dict[str, str] = {
    "real": "1. real only",
    "copy_paste": "2. real + copy-paste of real instances",
    "incontext": "3a. real + in-context synthgen (painted into tiles)",
    "synthgen": "3b. real + cut-and-paste synthgen",
    "synth_only": "4. synthgen only",
    "pretrain_finetune": "5. pre-train on synthgen, fine-tune on real",
    "real_long": "5c. real only, as many optimizer steps as arm 5 (its control)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupConfig(_Strict):
    """File-name regexes (first group = the id), matched case-insensitively: images sharing a
    `tile` id are copies of one source tile; images sharing a `frame` id were cut from one larger
    frame. Splits and draws keep whole frames together (whole tiles where no frame is named)."""

    tile: str | None = Field(None, description="e.g. '^(.+?)_jpg\\.rf\\.' (Roboflow's augmented copies)")
    frame: str | None = Field(None, description="e.g. '^(.+)_\\d+_\\d+_jpg\\.rf\\.' (tiles named FRAME_X_Y)")

    @field_validator("tile", "frame")
    @classmethod
    def _regex_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            rx = re.compile(v, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"not a valid regex ({e})") from e
        if rx.groups < 1:
            raise ValueError("the regex needs a group: its first group is the id")
        return v


class RatioArm(_Strict):
    """An arm that mixes a synthetic image list into every batch at the scale's ratio."""

    synthetic_ratio: float | None = Field(None, ge=0.0, le=1.0, description="default: the scale's ratio")


class IncontextArm(RatioArm):
    """Real + tiles painted by an in-context generator (kind "incontext"): augment-dataset is called
    with `generator=model` and no instance pool."""

    model: str = Field(..., description="in-context generator model folder (relative to this config)")


class PretrainArm(_Strict):
    """Pre-train on the cell's synthgen tiles only (arm 4's detector), then fine-tune on real."""

    finetune_epochs: int | None = Field(None, ge=1, description="default: the scale's detector epochs")


class ArmsConfig(_Strict):
    """Which arms run (a key present, even `{}`, runs it; `null` or absent does not) and their settings.
    Everything not set here (augmentation, image size, schedule) is the scale's, the same for all."""

    real: _Strict = Field(default_factory=_Strict)
    copy_paste: RatioArm | None = None
    incontext: IncontextArm | None = None
    synthgen: RatioArm | None = None
    synth_only: _Strict | None = None
    pretrain_finetune: PretrainArm | None = None
    real_long: _Strict | None = None

    def enabled(self) -> list[str]:
        return [a for a in ARMS if getattr(self, a) is not None]


class NativeConfig(_Strict):
    """Train at the animals' own pixel size: windows cut from the tiles at full resolution (the
    detector's imgsz is the window), and sliced inference on whole test tiles."""

    window: int = Field(320, ge=32, description="window side in tile pixels (= detector imgsz)")
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="overlap of the training windows (0: each pixel once)")
    slice_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="overlap of the slices at inference")
    min_visible: float = Field(0.5, gt=0.0, le=1.0, description="a box cut by a window edge is kept if this "
                               "much of it is inside, else dropped")


class CurveConfig(_Strict):
    """The real-only learning curve (`synthgen benchmark --learning-curve`) that sets `detector.epochs`."""

    epochs: int = Field(60, ge=2, description="epochs of the curve's detector")
    every: int = Field(2, ge=1, description="score every this many epochs")
    fraction: float = Field(0.1, gt=0, le=1, description="real fraction trained on")
    seeds: list[int] = Field(default_factory=lambda: [0])
    tolerance: float = Field(0.01, gt=0, description="within this mAP50 of the plateau")


class ScaleConfig(_Strict):
    """Everything that changes between a smoke test, a CPU run and a GPU run."""

    fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    detector: DetectorTrainConfig = Field(default_factory=DetectorTrainConfig)
    native: NativeConfig | None = Field(None, description="window training + sliced inference; null: whole "
                                        "tiles resized to detector.imgsz")
    synthetic_ratio: float = Field(0.5, ge=0.0, le=1.0, description="synthetic share of each batch (arms 2, 3)")
    synthetic_images: int = Field(500, ge=1, description="composed training tiles per cell (arms 2-5)")
    chips: dict[str, Any] = Field(default_factory=dict, description="detection.chips.ChipConfig fields")
    generator: dict[str, Any] = Field(default_factory=dict, description="synthgen.train TrainConfig fields")
    generate: dict[str, Any] = Field(default_factory=dict, description="n, query and GenerateConfig fields")
    compose: dict[str, Any] = Field(default_factory=dict, description="synthgen.compose ComposeConfig fields; "
                                    "`config: FILE` (relative to this config) is the base")
    filter: dict[str, Any] | None = Field(
        default_factory=dict, description="synthgen.filter FilterConfig fields, plus scorer (judge: trained on the "
        "cell's real chips; or bioclip[:PATH] / clip:NAME), judge (JudgeConfig fields) and val_fraction "
        "(held-out real chips for calibration); null skips filtering")
    eval_imgsz: int | None = Field(None, description="inference size on test images (default: detector imgsz)")
    eval_conf: float = 0.001  # low threshold for mAP; PRF1/counts use `operating_conf`
    operating_conf: float = 0.25
    max_eval_images: int | None = Field(None, ge=1, description="smoke runs only: score on the first N test "
                                        "(and validation) images; null scores all")
    bootstrap: int = Field(1000, ge=100, description="bootstrap replicates for the intervals")
    curve: CurveConfig = Field(default_factory=CurveConfig)

    @field_validator("fractions")
    @classmethod
    def _fractions_ok(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("fractions must be in (0, 1]")
        return sorted(set(v))

    @model_validator(mode="after")
    def _native_imgsz(self) -> ScaleConfig:
        if self.native is not None and self.detector.imgsz != self.native.window:
            raise ValueError(f"native.window {self.native.window} must equal detector.imgsz {self.detector.imgsz}: "
                             "the windows are trained at their own pixel size")
        return self


class BenchmarkConfig(_Strict):
    """Dataset, split rules, arms and the scales."""

    name: str
    dataset: str
    taxonomy: str | None = None
    test_split: str = Field("valid", description="given split used as the real test set (never trained on)")
    train_split: str = "train"
    val_fraction: float = Field(0.15, gt=0, lt=1, description="groups of train held out for early stopping")
    groups: GroupConfig = Field(default_factory=GroupConfig)
    split_seed: int = 0
    arms: ArmsConfig = Field(default_factory=lambda: ArmsConfig(
        copy_paste=RatioArm(), synthgen=RatioArm(), synth_only=_Strict(), pretrain_finetune=PretrainArm(),
        real_long=_Strict()))
    rare_taxa: list[str] = Field(default_factory=list, description="labels reported apart (few training boxes)")
    goal_fraction: float = 0.1
    goal_map50_gain: float = 0.05
    scales: dict[str, ScaleConfig] = Field(default_factory=lambda: {"cpu": ScaleConfig(), "gpu": ScaleConfig()})

    def scale(self, name: str) -> ScaleConfig:
        if name not in self.scales:
            raise ConfigError(f"benchmark {self.name}: no scale {name!r} (have {', '.join(self.scales)})")
        return self.scales[name]

    @classmethod
    def from_yaml(cls, path: str | Path) -> BenchmarkConfig:
        """Load and validate; every relative path in the file is resolved against the file's folder."""
        path = Path(path)
        raw = load_yaml_mapping(path)
        base = path.parent.resolve()

        def rel(x: Any) -> Any:
            return x if not isinstance(x, str) or Path(x).is_absolute() else str((base / x).resolve())

        for key in ("dataset", "taxonomy"):
            if raw.get(key):
                raw[key] = rel(raw[key])
        arms = raw.get("arms")
        if isinstance(arms, dict) and isinstance(arms.get("incontext"), dict) and "model" in arms["incontext"]:
            arms["incontext"]["model"] = rel(arms["incontext"]["model"])
        for s in (raw.get("scales") or {}).values():
            if not isinstance(s, dict):
                continue
            if isinstance(s.get("compose"), dict) and s["compose"].get("config"):
                s["compose"]["config"] = rel(s["compose"]["config"])
            det = s.get("detector")
            if isinstance(det, dict) and str(det.get("model", "")).endswith(".pt"):
                det["model"] = rel(det["model"])
        try:
            cfg = cls(**raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"{path}: {where}: {err['msg']} ({e.error_count()} error(s))") from e
        if not Path(cfg.dataset).is_dir():
            raise ConfigError(f"{path}: dataset folder {cfg.dataset} does not exist")
        if cfg.arms.incontext is not None and not Path(cfg.arms.incontext.model).is_dir():
            raise ConfigError(f"{path}: arms.incontext.model {cfg.arms.incontext.model} is not a folder")
        return cfg

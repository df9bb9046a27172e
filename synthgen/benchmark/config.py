"""Typed benchmark config: one YAML per dataset with a `cpu` and a `gpu` scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from detection.train import DetectorTrainConfig
from synthgen.config import load_yaml_mapping
from synthgen.errors import ConfigError

# arm id -> (short name, description). Names are what results.json and the report use.
ARMS: dict[str, str] = {
    "real": "1. real only",
    "copy_paste": "2. real + copy-paste of real instances",
    "synthgen": "3. real + synthgen instances",
    "synth_only": "4. synthgen only",
    "pretrain_finetune": "5. pre-train on synthgen, fine-tune on real",
}
ArmName = Literal["real", "copy_paste", "synthgen", "synth_only", "pretrain_finetune"]


class ScaleConfig(BaseModel):
    """Everything that changes between a quick CPU run and a real GPU run."""

    model_config = ConfigDict(extra="forbid")

    fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    detector: DetectorTrainConfig = Field(default_factory=DetectorTrainConfig)
    synthetic_ratio: float = Field(0.5, ge=0.0, le=1.0, description="synthetic share of each batch (arms 2, 3)")
    synthetic_images: int = Field(500, description="composed training tiles per cell (arms 2-5)")
    chips: dict[str, Any] = Field(default_factory=dict, description="detection.chips.ChipConfig fields")
    generator: dict[str, Any] = Field(default_factory=dict, description="synthgen.train TrainConfig fields")
    generate: dict[str, Any] = Field(default_factory=dict, description="n, query and GenerateConfig fields")
    compose: dict[str, Any] = Field(default_factory=dict, description="synthgen.compose ComposeConfig fields")
    filter: dict[str, Any] | None = Field(
        default_factory=dict, description="synthgen.filter FilterConfig fields, plus scorer (judge: trained on the "
        "cell's real chips; or bioclip[:PATH] / clip:NAME), judge (JudgeConfig fields) and val_fraction "
        "(held-out real chips for calibration); null skips filtering")
    eval_imgsz: int | None = Field(None, description="inference size on test images (default: detector imgsz)")
    eval_conf: float = 0.001  # low threshold for mAP; PRF1/counts use `operating_conf`
    operating_conf: float = 0.25

    @field_validator("fractions")
    @classmethod
    def _fractions_ok(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("fractions must be in (0, 1]")
        return sorted(set(v))


class BenchmarkConfig(BaseModel):
    """Dataset, split rules, arms and the two scales. Paths are relative to the config file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dataset: str
    taxonomy: str | None = None
    test_split: str = Field("valid", description="given split used as the real test set (never trained on)")
    train_split: str = "train"
    val_fraction: float = Field(0.15, gt=0, lt=1, description="groups of train held out for early stopping")
    group_pattern: str | None = Field(
        None, description="regex whose first group is the file-name group id (augmented copies, frames, sites)"
    )
    split_seed: int = 0
    arms: list[ArmName] = Field(default_factory=lambda: list(ARMS))
    rare_taxa: list[str] = Field(default_factory=list, description="labels reported apart (few training boxes)")
    goal_fraction: float = 0.1
    goal_map50_gain: float = 0.05
    scales: dict[str, ScaleConfig] = Field(default_factory=lambda: {"cpu": ScaleConfig(), "gpu": ScaleConfig()})

    @field_validator("arms")
    @classmethod
    def _real_first(cls, v: list[str]) -> list[str]:
        if "real" not in v:
            raise ValueError("the 'real' arm is the baseline every difference is paired against; keep it")
        return v

    def scale(self, name: str) -> ScaleConfig:
        if name not in self.scales:
            raise ConfigError(f"benchmark {self.name}: no scale {name!r} (have {', '.join(self.scales)})")
        return self.scales[name]

    @classmethod
    def from_yaml(cls, path: str | Path) -> BenchmarkConfig:
        path = Path(path)
        raw = load_yaml_mapping(path)
        base = path.parent
        for key in ("dataset", "taxonomy"):
            if raw.get(key) and not Path(raw[key]).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        try:
            cfg = cls(**raw)
        except ValidationError as e:
            raise ConfigError(f"{path}: {e}") from e
        if not Path(cfg.dataset).is_dir():
            raise ConfigError(f"{path}: dataset folder {cfg.dataset} does not exist")
        return cfg

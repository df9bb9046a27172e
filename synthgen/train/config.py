"""Typed training config (YAML under configs/train/); every default gives a working run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from synthgen.config import YamlConfig
from synthgen.incontext.windows import WindowConfig

TrainPart = Literal["unet", "mlp", "new", "previous", "all"]


class StageConfig(BaseModel):
    """Per-stage overrides; unset fields fall back to the run-wide values."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = None
    lr: float | None = None
    train: list[TrainPart] | None = None


class TrainConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    # pixel: the UNet draws whole chips; incontext: it paints the animal into a hole in a real tile window
    backend: Literal["pixel", "incontext"] = "pixel"
    chips: Path | None = None  # pixel: chips folder with manifest.jsonl (or pass --chips)
    data: Path | None = None  # incontext: the detection dataset (data.yaml) whose tiles give the windows
    taxonomy: Path | None = None  # incontext: labels -> lineages (configs/taxonomy/*.csv)
    window: WindowConfig = WindowConfig()
    split: str | None = "train"  # only this split trains the generator; test images stay out
    image_size: int = 48
    preset: str = "small"
    mlp: bool = True

    mode: Literal["progressive", "flat"] = "progressive"
    steps_per_stage: int = 2000
    stages: list[StageConfig] = []  # optional overrides, stage 1 first
    train_parts: list[TrainPart] = ["unet", "mlp", "new"]  # default: earlier tables frozen
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999

    p_uncond: float = 0.1
    p_drop: float = 0.3
    hflip: bool = True
    dihedral: bool = False  # all eight flips/rotations: nadir views have no up (off for ground views)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE
    mask_padding: bool = True  # leave padded window pixels out of the loss (incontext)
    num_train_timesteps: int = 1000
    # v at zero terminal SNR lets the first sampling steps set colour and layout (synthgen.models.prediction)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"

    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads (leave cores to others on a shared machine)

    @field_validator("p_uncond", "p_drop")
    @classmethod
    def _prob(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be a probability in [0, 1]")
        return v

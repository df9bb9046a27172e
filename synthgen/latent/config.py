"""Typed configs for the latent (Stable Diffusion + LoRA) backend; every default runs."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from synthgen.config import YamlConfig
from synthgen.guidance import GuidanceConfig, GuidanceMode


class _Base(YamlConfig):
    model_config = ConfigDict(extra="forbid")



class LoraConfig(_Base):
    """LoRA on the UNet attention projections (peft)."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class ConditionerConfig(_Base):
    """TaxaDiffusion-style per-rank modules: rank text -> frozen encoder -> small MLP, summed."""

    hidden: int = Field(256, ge=1)
    rank_template: str = "{level}: {name}"
    base_prompt: str = "a photo of an animal"
    freeze_previous: bool = False  # later stages: keep training earlier ranks' modules (default) or freeze them


class DreamBoothConfig(_Base):
    """Plain LoRA fine-tuning on one taxon's images with one prompt ("From Noise to Nature")."""

    prompt: str = "a photo of an animal"
    taxon: str | None = None  # chips folder: train only this taxon; image folder: the taxon to record
    label: str | None = None
    # prior preservation (DreamBooth): the base model's own images of the class keep the LoRA from
    # forgetting what the class looks like in general; 0 class images switches it off
    class_prompt: str | None = None
    num_class_images: int = Field(0, ge=0)
    prior_weight: float = Field(1.0, ge=0)
    class_steps: int = Field(30, ge=1)


class LatentTrainConfig(_Base):
    """Train config for `backend: latent` (the pixel engineer's train config reads `backend` too)."""

    backend: Literal["latent"] = "latent"
    method: Literal["taxonomy", "dreambooth"] = "taxonomy"
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16": the hub's half-size weight files (loaded, then cast as needed)
    local_files_only: bool = False
    chips: str | None = None  # chips folder (or, for dreambooth, an image folder); the CLI's --chips overrides it
    resolution: int = Field(512, ge=8)
    split: str = "train"
    levels: list[str] | None = None  # subset of the taxonomy levels to condition on (coarse to fine)
    steps_per_stage: int | list[int] = 500
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    conditioner_lr: float | None = None
    weight_decay: float = 1e-2
    snr_gamma: float | None = None
    cond_dropout: float = Field(0.1, ge=0, le=1)  # drop all conditioning -> unconditional (for CFG)
    level_dropout: float = Field(0.2, ge=0, le=1)  # drop the finest ranks -> parent conditional (taxonomic guidance)
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1)  # CPU threads (torch.set_num_threads); None = torch's default
    mixed_precision: Literal["bf16", "no"] = "bf16"  # bf16 on CUDA only
    gradient_checkpointing: bool = False
    xformers: bool = False  # SDPA is used by default; xformers only if installed and asked for
    checkpoint_every: int = Field(100, ge=1)
    num_workers: int = 0
    lora: LoraConfig = Field(default_factory=LoraConfig)
    conditioner: ConditionerConfig = Field(default_factory=ConditionerConfig)
    dreambooth: DreamBoothConfig = Field(default_factory=DreamBoothConfig)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {v}")
        return v


class LatentGuidanceConfig(GuidanceConfig):
    """The one GuidanceConfig with the latent kind's defaults: classifier-free at 7.5, and in
    taxonomic mode a reference itself classifier-free guided at 5 (a bare parent is weak in SD)."""

    mode: GuidanceMode = "cfg"
    scale: float = 7.5
    cfg_scale: float | None = 5.0


class CutConfig(_Base):
    """Segment the generated animal and cut it out (RGBA chip) for the compositor."""

    enabled: bool = True
    method: Literal["grabcut"] = "grabcut"
    margin: float = Field(0.05, ge=0, lt=0.5)  # fraction of the side left as background seed
    iterations: int = Field(5, ge=1)
    context: float = Field(0.15, ge=0, le=1)  # chip context per side, fraction of max(w, h) (as `data chips --margin`)
    min_area: float = Field(0.01, ge=0, le=1)  # masks smaller (or > 1 - min_area) fall back to the full image


class LatentGenerateConfig(_Base):
    """Generation config for a latent model folder."""

    resolution: int | None = None  # default: the training resolution
    steps: int = Field(30, ge=1)
    sampler: Literal["ddim", "dpm", "dpm++", "euler", "euler_a", "pndm", "ddpm"] = "dpm++"
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    prompt: str | None = None  # dreambooth models: default is the training prompt
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    mixed_precision: Literal["bf16", "no"] = "bf16"
    local_files_only: bool = False
    xformers: bool = False
    base_model: str | None = None  # override where the base weights are (e.g. a local copy)
    guidance: LatentGuidanceConfig = Field(default_factory=LatentGuidanceConfig)
    cut: CutConfig = Field(default_factory=CutConfig)


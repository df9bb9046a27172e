"""Latent backend: pretrained Stable Diffusion (1.5 / 2.x / SDXL) + LoRA, taxonomy-conditioned
(TaxaDiffusion) or prompt-conditioned (DreamBooth-style), then instances cut out for the compositor."""

from synthgen.latent.config import LatentGenerateConfig, LatentTrainConfig
from synthgen.latent.generate import LatentGenerateResult, generate_latent
from synthgen.latent.loading import ModelLoadError, SDComponents, load_sd
from synthgen.latent.train import TrainResult, train_latent

__all__ = [
    "LatentGenerateConfig", "LatentGenerateResult", "LatentTrainConfig", "ModelLoadError", "SDComponents",
    "TrainResult", "generate_latent", "load_sd", "train_latent",
]

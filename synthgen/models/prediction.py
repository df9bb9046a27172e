"""What the UNet predicts: the noise (epsilon) or v = sqrt(a) * noise - sqrt(1 - a) * x0.

Why v: with epsilon the model's implied x0 at the start of sampling (a -> 0) is its output amplified by
1/sqrt(a), so nothing it learned about the images' colour and layout reaches the first steps and samples
start from a grey mean (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
v-prediction at zero terminal SNR, sampled from the last timestep ("trailing" spacing), fixes that.
"""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction"]


def training_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The regression target for x_t = sqrt(a) x0 + sqrt(1 - a) noise (a = alpha-bar, broadcastable)."""
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    return noise


def eps_and_x0(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, x0) implied by the model output `out` at x_t = x."""
    if prediction_type == "v_prediction":
        return (1 - a).sqrt() * x + a.sqrt() * out, a.sqrt() * x - (1 - a).sqrt() * out
    return out, (x - (1 - a).sqrt() * out) / a.sqrt()

"""Sampling (fast guided loop over diffusers schedulers) and resumable chip generation."""

from synthgen.pipelines.generate import GenerateConfig, GenerateResult, generate, resolve_targets
from synthgen.pipelines.sampling import SAMPLERS, GuidedSampler, load_model

__all__ = [
    "SAMPLERS",
    "GenerateConfig",
    "GenerateResult",
    "GuidedSampler",
    "generate",
    "load_model",
    "resolve_targets",
]

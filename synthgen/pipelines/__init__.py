"""Sampling (fast guided loop over diffusers schedulers) and resumable chip generation."""

from synthgen.pipelines.generate import GenerateConfig, GenerateResult, generate, resolve_targets
from synthgen.pipelines.sampling import SAMPLERS, GuidedSampler, load_model, make_scheduler

__all__ = [
    "SAMPLERS",
    "GenerateConfig",
    "GenerateResult",
    "GuidedSampler",
    "generate",
    "load_model",
    "make_scheduler",
    "resolve_targets",
]

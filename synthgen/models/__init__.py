"""Pixel-space diffusion models conditioned on a taxonomy (UNet2DModel + per-level embeddings)."""

from synthgen.models.conditioned import (
    PRESETS,
    ConditionedUNet,
    TaxonomyEncoder,
    TaxonVocab,
    build_unet,
)

__all__ = ["PRESETS", "ConditionedUNet", "TaxonVocab", "TaxonomyEncoder", "build_unet"]

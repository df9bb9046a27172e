"""Compositor (`synthgen augment-dataset`): paste pool instances into real tiles with labels taken
from the pasted alpha."""

from synthgen.compose.config import ComposeConfig
from synthgen.compose.pipeline import AugmentResult, augment_dataset, compose_tile, draw_previews

__all__ = ["AugmentResult", "ComposeConfig", "augment_dataset", "compose_tile", "draw_previews"]

"""`synthgen train`: progressive (TaxaDiffusion-style) or flat training of the conditioned UNet."""

from synthgen.train.config import StageConfig, TrainConfig
from synthgen.train.data import ChipSet, load_chips
from synthgen.train.trainer import TrainResult, drop_conditions, plan_stages, train

__all__ = [
    "ChipSet",
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "drop_conditions",
    "load_chips",
    "plan_stages",
    "train",
]

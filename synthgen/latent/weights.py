"""LoRA + per-rank module weights and resumable training state, all as safetensors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from synthgen.errors import SynthgenError
from synthgen.io_utils import atomic_write


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors bytes written atomically (temp + rename)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SynthgenError(f"{path}: weights file not found")
    try:
        return load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise SynthgenError(f"{path}: not a readable safetensors file ({e})") from e


def add_lora(unet: Any, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """Inject a peft LoRA adapter into the UNet's attention projections (only it is trainable)."""
    from peft import LoraConfig

    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                    target_modules=list(targets), init_lora_weights="gaussian"))
    except ValueError as e:
        raise SynthgenError(f"LoRA targets {targets} match no UNet module ({e})") from e


def lora_state(unet: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def load_lora(unet: Any, path: Path) -> None:
    """Load LoRA weights saved by `save_lora` into a UNet that already has the adapter."""
    from peft.utils import set_peft_model_state_dict

    state = load_tensors(path)
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise SynthgenError(f"{path}: {len(unexpected)} LoRA tensors do not match the base UNet (e.g. {unexpected[0]})")


def files_hash(paths: list[Path]) -> str:
    """Short content hash of the trained weights: the `model` field of generated rows."""
    h = hashlib.sha256()
    for p in paths:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


"""Device choice and mixed precision: CPU here, bf16 autocast on CUDA for users with a GPU."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device (clear error if absent)."""
    from synthgen.errors import SynthgenError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SynthgenError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU bf16 is slower than fp32 for these models)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

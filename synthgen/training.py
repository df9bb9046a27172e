"""The training core every generator loop shares: seeded per-step randomness, the warm-up/cosine
learning rate, EMA, optimizer state as safetensors, atomic checkpoints and the one resume rule.

Why one core: a resumed run must take exactly the batches, noise and learning rates the
uninterrupted run would, and that only holds if every loop draws, schedules and checkpoints alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from synthgen.errors import SynthgenError


def seeded_generator(*key: int) -> torch.Generator:
    """A torch generator seeded by a hash of `key` (seed, step, micro-batch, process): every draw of a
    step depends on nothing but the step."""
    h = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(h)


def warmup_cosine(base_lr: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base_lr` down to 10% at `steps`."""
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup))
    return lr * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class EMA:
    """Shadow copy of every weight; decay warms up so early EMA weights are not just the init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors tensors (`{prefix}{param}.{name}`) + a JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}.{name}"] = v.contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "") -> None:
    """Inverse of `optimizer_tensors` (tensors without `prefix` are other state and left out)."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fingerprint(key: dict) -> str:
    """Short hash of what must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_checkpoint(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                     texts: dict[str, str] | None = None) -> None:
    """Every file into a hidden sibling folder, then one rename: a kill leaves the old checkpoint or
    the new one, never half of one. `state.json` carries `state` (with its fingerprint)."""
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, ts in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in ts.items()}, str(tmp / name))
    for name, text in (texts or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def latest_checkpoint(ckdir: Path, pattern: str = "step-*") -> Path | None:
    """The newest complete checkpoint folder (one holding state.json), or None."""
    cks = sorted(p for p in ckdir.glob(pattern) if (p / "state.json").exists())
    return cks[-1] if cks else None


def prune_checkpoints(ckdir: Path, keep: int, pattern: str = "step-*") -> None:
    for old in sorted(ckdir.glob(pattern))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_state(folder: Path, fp: str) -> dict | None:
    """The state of checkpoint `folder` if there is one; the one resume rule: a checkpoint made with
    another model, data or settings (another fingerprint) is refused, never mixed in."""
    path = folder / "state.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("fingerprint") != fp:
        raise SynthgenError(f"{folder}: checkpoint is from a different model, data or settings (preset, size, taxa or "
                            f"config changed); use a new --out or delete {folder.parent}")
    return state


def make_accelerator(device: torch.device, grad_accum: int = 1):
    """accelerate's Accelerator for `device`: bf16 autocast on CUDA, plain fp32 on CPU."""
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no",
                       gradient_accumulation_steps=grad_accum)

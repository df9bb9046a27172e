"""Guidance for every generator kind: which reference condition a target is steered away from,
and the one guided combination.

cfg: reference = all levels none (classifier-free guidance).
taxonomic: reference = the target's ancestor at a chosen level ("parent" as FineDiffusion's
superclass, "root" as TaxaDiffusion, or a level name), so guidance pushes towards what tells the
target apart from its relatives rather than from "any animal". With `cfg_scale` set the reference
is itself classifier-free guided (the latent kind's default, where the unguided parent is weak).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthgen.errors import SynthgenError

GuidanceMode = Literal["taxonomic", "cfg", "none"]


class GuidanceConfig(BaseModel):
    """One guidance setting for pixel and latent models; each kind's generate config sets its own defaults."""

    model_config = ConfigDict(extra="forbid")
    mode: GuidanceMode = "taxonomic"
    scale: float = 2.0
    reference: str = "parent"
    window: tuple[float, float] = (0.0, 1.0)
    cfg_scale: float | None = Field(None, description="taxonomic mode: classifier-free guide the reference too")

    @field_validator("window")
    @classmethod
    def _window(cls, w: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 <= w[0] <= w[1] <= 1.0):
            raise ValueError(f"guidance window must satisfy 0 <= start <= end <= 1, got {w}")
        return w

    def active(self, i: int, n: int) -> bool:
        """Whether step i of n (0 = noisiest) is inside the guidance window."""
        return self.mode != "none" and self.window[0] <= i / n < self.window[1] + 1e-9 and self.scale != 1.0

    def record(self) -> dict:
        """What a pool row stores of it (cfg_scale only where set, so older rows still match)."""
        out = {"mode": self.mode, "scale": self.scale, "reference": self.reference, "window": list(self.window)}
        return out if self.cfg_scale is None else {**out, "cfg_scale": self.cfg_scale}


def reference_codes(codes: tuple[int, ...], mode: GuidanceMode, reference: str, levels: list[str]) -> tuple[int, ...]:
    """The reference condition for one target's codes (levels listed coarse to fine)."""
    if mode == "cfg" or mode == "none":
        return (0,) * len(codes)
    defined = [i for i, c in enumerate(codes) if c]
    if not defined:
        return tuple(codes)
    if reference == "parent":
        keep = defined[-2] if len(defined) > 1 else -1
    elif reference == "root":
        keep = defined[0]
    elif reference in levels:
        keep = levels.index(reference)
        if keep >= defined[-1]:
            keep = defined[-2] if len(defined) > 1 else -1  # the target is at or above that level
    else:
        raise SynthgenError(f"unknown guidance reference {reference!r}: use parent, root or one of {levels}")
    return tuple(c if i <= keep else 0 for i, c in enumerate(codes))


def reference_depth(lineage: dict[str, str], levels: list[str], reference: str) -> int:
    """How many leading levels the taxonomic reference of `lineage` keeps (models conditioned on a
    level prefix rather than on codes)."""
    ref = reference_codes(tuple(int(bool(lineage.get(lv))) for lv in levels), "taxonomic", reference, levels)
    kept = [i for i, c in enumerate(ref) if c]
    return kept[-1] + 1 if kept else 0


def combine(eps_target: torch.Tensor, eps_ref: torch.Tensor, scale: float, eps_uncond: torch.Tensor | None = None,
            cfg_scale: float | None = None) -> torch.Tensor:
    """eps(ref) + w * (eps(target) - eps(ref)); with an unconditional prediction and `cfg_scale`
    the reference term is itself guided: eps(u) + c * (eps(ref) - eps(u)) + w * (eps(target) - eps(ref))."""
    if eps_uncond is None or cfg_scale is None:
        return torch.lerp(eps_ref, eps_target, scale)
    return torch.lerp(eps_uncond, eps_ref, cfg_scale) + scale * (eps_target - eps_ref)

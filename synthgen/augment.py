"""Random flips and rotations of training batches, drawn from the step's own generator (exact resume)."""

from __future__ import annotations

import torch


def flip_rotate(x: torch.Tensor, g: torch.Generator, dihedral: bool, hflip: bool) -> torch.Tensor:
    """Each sample [C,H,W] under one of the eight flips/rotations (nadir views have no up), or only a
    horizontal flip with probability 0.5 (ground views), or unchanged."""
    if dihedral:
        k = torch.randint(4, (len(x),), generator=g)
        flip = torch.rand(len(x), generator=g) < 0.5
        return torch.stack([(s.flip(-1) if f else s).rot90(int(r), (-2, -1)) for s, r, f in zip(x, k, flip, strict=True)])
    if hflip:
        flip = torch.rand(len(x), generator=g) < 0.5
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x

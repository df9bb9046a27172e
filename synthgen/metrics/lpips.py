"""LPIPS diversity (mean pairwise perceptual distance) from a local weights file, never a download.

The `lpips` package fetches its backbone from the torchvision hub; here the network is built with a
random backbone and no linear weights, and every tensor comes from the user's file, so it runs offline.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.device import resolve_device
from synthgen.errors import SynthgenError
from synthgen.scoring.base import load_image

# channels of the linear heads identify the backbone
NETS = {(64, 192, 384, 256, 256): "alex", (64, 128, 256, 512, 512): "vgg",
        (64, 128, 256, 384, 384, 512, 512): "squeeze"}
MAKE_HINT = ("make one on a machine with internet: python -c \"import lpips; from safetensors.torch import save_model; "
             "save_model(lpips.LPIPS(net='alex'), 'lpips_alex.safetensors')\" (save_model, not save_file: "
             "LPIPS shares tensors between lin0 and lins.0)")
SIZE = 64  # the patch size LPIPS was calibrated on
MAX_PAIRS = 256


def _canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lins.K.*` aliases `linK.*` (same tensors); keep one name so files saved either way compare equal."""
    return {re.sub(r"^lins\.(\d+)\.", r"lin\1.", k): v for k, v in sd.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SynthgenError(f"{path}: LPIPS weights file not found; {MAKE_HINT}")
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise SynthgenError(f"{path}: LPIPS weights must be .safetensors or .pth; {MAKE_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip readers each raise their own types
        raise SynthgenError(f"{path}: cannot read LPIPS weights ({type(e).__name__}: {e}); {MAKE_HINT}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SynthgenError(f"{path}: not a state dict of tensors; {MAKE_HINT}")
    return _canonical(sd)


def load_lpips(path: str | Path, net: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """LPIPS model with every weight from `path` (backbone + linear heads); `net` is inferred when None."""
    import lpips

    path = Path(path)
    sd = _read(path)
    chns = tuple(int(sd[f"lin{i}.model.1.weight"].shape[1]) for i in range(7) if f"lin{i}.model.1.weight" in sd)
    found = NETS.get(chns)
    if found is None:
        raise SynthgenError(f"{path}: not a full LPIPS state dict (linear heads with channels {list(chns)} match "
                            f"none of {sorted(NETS.values())}); {MAKE_HINT}")
    if net is not None and net != found:
        raise SynthgenError(f"{path}: holds LPIPS net {found!r}, not the requested {net!r}")
    with warnings.catch_warnings():  # torchvision's deprecation notice for pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=found, pretrained=False, pnet_rand=True, verbose=False)
    want = _canonical(model.state_dict())
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise SynthgenError(f"{path}: keys do not match LPIPS net {found!r} (missing {missing[:4]}"
                            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                            f"{'...' if len(unexpected) > 4 else ''}); {MAKE_HINT}")
    bad = [k for k in want if want[k].shape != sd[k].shape]
    if bad:
        raise SynthgenError(f"{path}: tensor shapes do not match LPIPS net {found!r} ({bad[:4]}); {MAKE_HINT}")
    model.load_state_dict(sd, strict=False)  # strict would also demand the lins.K aliases
    return model.to(resolve_device(device)).eval()


def _tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images resized to size x size, scaled to [-1, 1] as LPIPS expects."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.inference_mode()
def lpips_distance(model: torch.nn.Module, a: Sequence[Image.Image], b: Sequence[Image.Image], size: int = SIZE,
                   batch: int = 64) -> np.ndarray:
    """LPIPS between a[i] and b[i] for each i."""
    if len(a) != len(b):
        raise SynthgenError(f"lpips_distance needs equal lengths, got {len(a)} and {len(b)}")
    dev = next(model.parameters()).device
    out = [model(_tensor(a[s:s + batch], size).to(dev), _tensor(b[s:s + batch], size).to(dev)).flatten().cpu()
           for s in range(0, len(a), batch)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _pairs(n: int, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """All distinct pairs (i < j) when there are at most max_pairs, else max_pairs of them drawn by rng."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.stack(np.triu_indices(n, 1), 1)
    chosen: dict[tuple[int, int], None] = {}  # insertion-ordered: the draw is reproducible from the seed
    while len(chosen) < max_pairs:
        i, j = rng.integers(n, size=(2, max_pairs))
        for p, q in zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist(), strict=True):
            if p != q:
                chosen.setdefault((p, q), None)
    return np.array(list(chosen)[:max_pairs])


def mean_pairwise_lpips(model: torch.nn.Module, images: Sequence[Image.Image | Path], max_pairs: int = MAX_PAIRS,
                        size: int = SIZE, batch: int = 64, seed: int = 0) -> tuple[float, int]:
    """Diversity of one set: mean LPIPS over distinct pairs (at most max_pairs, drawn by seed) and the
    number of pairs used. Paths are opened only for the chips that take part in a pair."""
    pairs = _pairs(len(images), max_pairs, np.random.default_rng(seed))
    if not len(pairs):
        return float("nan"), 0
    used = {int(i): images[i] for i in np.unique(pairs)}
    loaded = {i: load_image(x) if isinstance(x, Path) else x for i, x in used.items()}
    d = lpips_distance(model, [loaded[int(i)] for i in pairs[:, 0]], [loaded[int(j)] for j in pairs[:, 1]],
                       size, batch)
    return float(d.mean()), len(pairs)

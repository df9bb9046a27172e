"""Transmutation: a real chip of taxon A becomes taxon B in the same pose and light.

The chip is taken back to the time where A and B branch (deterministic DDIM inversion under A's
condition, or seeded forward noising), then denoised under B with guidance. Below the branch
time the two taxa share one reverse process, so what is decided there (layout, pose, light)
is kept and what tells A from B is redrawn. Output: PNG + a manifest row like `generate`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field

from synthgen.branching import branch_time, load_branch_points
from synthgen.config import YamlConfig
from synthgen.device import autocast, resolve_device
from synthgen.errors import SynthgenError
from synthgen.generator import read_index
from synthgen.guidance import GuidanceConfig, combine, reference_codes
from synthgen.io_utils import JsonlAppender, atomic_save_image, read_jsonl
from synthgen.models import ConditionedUNet
from synthgen.models.delta import load_model_folder, model_id
from synthgen.models.prediction import eps_and_x0
from synthgen.pipelines.generate import image_seed, resolve_targets, slug
from synthgen.schedulers import make_scheduler, read_scheduler_config


class TransmuteConfig(YamlConfig):
    """How a chip is turned into another taxon (YAML or `synthgen transmute` flags)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["inversion", "noise"] = "inversion"
    steps: int = Field(50, ge=1)  # DDIM steps over the whole schedule; only those below the branch time run
    strength: float | None = Field(None, ge=0.0, le=1.0)  # t/T override; else the branch point
    default_strength: float = Field(0.5, ge=0.0, le=1.0)  # when no branch point is known for the pair
    guidance: GuidanceConfig = GuidanceConfig()
    seed: int = 0
    device: str = "auto"


def _ddim_timesteps(sched_config: dict, steps: int, t_start: int) -> list[int]:
    """The DDIM timesteps (descending) at or below t_start, t_start itself first."""
    sched = make_scheduler("ddim", sched_config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps if int(t) < t_start]
    return [t_start, *ts] if t_start > 0 else []


@torch.inference_mode()
def _model_out(model: ConditionedUNet, x: torch.Tensor, t: int, emb: torch.Tensor, emb_ref: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    dev = x.device
    tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
    with autocast(dev):
        if emb_ref is None:
            return model.unet(x, tt, class_labels=emb).sample.float()
        out = model.unet(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([emb, emb_ref])).sample.float()
    b = x.shape[0]
    return combine(out[:b], out[b:], scale)


@torch.inference_mode()
def transmute_tensor(model: ConditionedUNet, sched_config: dict, x0: torch.Tensor, codes_from: tuple[int, ...],
                     codes_to: tuple[int, ...], t_start: int, cfg: TransmuteConfig, seed: int) -> torch.Tensor:
    """x0 [B,3,S,S] in [-1,1] -> transmuted images in [-1,1] (B,3,S,S), on CPU."""
    dev = next(model.parameters()).device
    ac = make_scheduler("ddim", sched_config).alphas_cumprod.to(dev)
    ptype = sched_config.get("prediction_type", "epsilon")
    x0 = x0.to(dev)
    b = x0.shape[0]
    down = _ddim_timesteps(sched_config, cfg.steps, t_start)
    if not down:
        return x0.cpu()
    levels = model.vocab.levels
    ref_to = reference_codes(codes_to, cfg.guidance.mode, cfg.guidance.reference, levels)
    with autocast(dev):
        emb_from, emb_to, emb_ref = model.encoder(torch.tensor([codes_from, codes_to, ref_to], device=dev)).float().split(1)
    emb_from, emb_to, emb_ref = (e.expand(b, -1) for e in (emb_from, emb_to, emb_ref))
    if cfg.method == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        x = ac[t_start].sqrt() * x0 + (1 - ac[t_start]).sqrt() * noise
    else:  # DDIM inversion under A's own condition (no guidance: inversion must be deterministic and exact-ish)
        x = x0
        up = list(reversed(down))  # ascending: t_1 < ... < t_start
        prev_t = -1
        for t in up:
            a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0, device=dev)
            eps, x0_hat = eps_and_x0(_model_out(model, x, max(prev_t, 0), emb_from, None, 1.0), x, a_prev, ptype)
            x = ac[t].sqrt() * x0_hat + (1 - ac[t]).sqrt() * eps
            prev_t = t
    n = len(down)
    for i, t in enumerate(down):
        a_t = ac[t]
        a_prev = ac[down[i + 1]] if i + 1 < n else torch.tensor(1.0, device=dev)
        guided = cfg.guidance.active(i, n) and cfg.guidance.mode != "none"
        eps, x0_hat = eps_and_x0(_model_out(model, x, t, emb_to, emb_ref if guided else None, cfg.guidance.scale), x, a_t,
                                 ptype)
        x0_hat = x0_hat.clamp(-1, 1)
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    return x.float().clamp(-1, 1).cpu()


def _lineage_of(model_dir: Path, query: str) -> tuple[str, str, dict[str, str]]:
    """(taxon, label, lineage) of a trained taxon; the one with most chips when the query is a group."""
    targets = resolve_targets(model_dir, query)
    exact = [t for t in targets if query.lower() in (t.taxon.lower(), t.label.lower())]
    best = exact[0] if exact else max(targets, key=lambda t: t.weight)
    return best.taxon, best.label, best.lineage


def transmute(model_dir: str | Path, image: str | Path, to_taxon: str, out: str | Path, from_taxon: str | None = None,
              cfg: TransmuteConfig | None = None, n: int = 1) -> list[dict]:
    """Write n transmutations of `image` (taxon `from_taxon`) into `to_taxon` under `out`; returns
    their manifest rows. Rerunning skips what is done (same image, target, settings, index)."""
    cfg = cfg or TransmuteConfig()
    model_dir, image, out = Path(model_dir), Path(image), Path(out)
    if not image.exists():
        raise SynthgenError(f"{image}: image not found")
    read_index(model_dir)
    sched_config = read_scheduler_config(model_dir)
    to_name, to_label, to_lin = _lineage_of(model_dir, to_taxon)
    from_name, from_lin = None, {}
    if from_taxon:
        from_name, _, from_lin = _lineage_of(model_dir, from_taxon)
    T = int(sched_config["num_train_timesteps"])
    if cfg.strength is not None:
        t_start, source = int(round(cfg.strength * (T - 1))), "strength"
    else:
        bp = load_branch_points(model_dir)
        t_b = branch_time(bp, from_name, to_name, from_lin, to_lin) if bp and from_name else None
        if t_b is not None:
            t_start, source = t_b, "branch_points"
        else:
            t_start, source = int(round(cfg.default_strength * (T - 1))), "default_strength"
    settings = {"sampler": f"ddim-{cfg.method}", "steps": cfg.steps,
                "guidance": cfg.guidance.record(),
                "model": model_id(model_dir)}
    manifest = out / "manifest.jsonl"
    key = f"{image.resolve()}>{to_name}"
    done = {r["index"]: r for r in read_jsonl(manifest)
            if r.get("query") == key and all(r.get(k) == v for k, v in settings.items()) and (out / r["file"]).exists()}
    todo = [i for i in range(n) if i not in done]
    rows = [done[i] for i in sorted(done)]
    if not todo:
        return rows
    model = load_model_folder(model_dir).eval().to(resolve_device(cfg.device))
    try:
        with Image.open(image) as im:
            src = im.convert("RGB").resize((model.sample_size, model.sample_size), Image.BICUBIC)
    except OSError as e:
        raise SynthgenError(f"{image}: cannot read image ({e})") from e
    x0 = torch.from_numpy(np.array(src)).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
    codes_from = model.vocab.encode(from_lin) if from_lin else (0,) * len(model.vocab.levels)
    codes_to = model.vocab.encode(to_lin)
    sub = slug(to_name)
    with JsonlAppender(manifest) as app:
        for i in todo:
            seed = image_seed(cfg.seed, key, i)
            y = transmute_tensor(model, sched_config, x0, codes_from, codes_to, t_start, cfg, seed)[0]
            arr = ((y + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            rel = f"{sub}/{slug(image.stem)}_to_{sub}_{i:03d}.png"
            atomic_save_image(Image.fromarray(arr), out / rel)
            row = {"file": rel, "index": i, "query": key, "label": to_label, "taxon": to_name, "lineage": to_lin,
                   "seed": seed, "size": model.sample_size, **settings, "source_image": str(image.resolve()),
                   "from_taxon": from_name, "t_start": t_start, "t_source": source}
            app.write(row)
            rows.append(row)
    return rows

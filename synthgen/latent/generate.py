"""Generate with a trained latent model: full frames at 512/1024 px, then the animal is cut out.

Resume and manifest rows follow the pixel backend (synthgen.pipelines.generate): an index is
done when its manifest row exists and its file is there; every image has its own seed.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from synthgen.device import autocast, resolve_device
from synthgen.errors import SynthgenError
from synthgen.guidance import combine, reference_depth
from synthgen.io_utils import JsonlAppender, atomic_save_image, read_jsonl
from synthgen.latent.conditioning import ContextBuilder, TaxonomyConditioner, unet_kwargs
from synthgen.latent.config import LatentGenerateConfig
from synthgen.latent.cutout import cut_instance
from synthgen.latent.loading import SDComponents, enable_memory_savers, load_sd
from synthgen.latent.train import MODEL_FILE, load_trained
from synthgen.pipelines.generate import image_seed, resolve_targets, slug
from synthgen.schedulers import make_scheduler


@dataclass
class LatentGenerateResult:
    out: Path
    written: int
    already: int
    cut: int
    seconds: float

    def summary(self) -> str:
        return (f"generated {self.written} images ({self.cut} cut out, {self.already} already there) "
                f"in {self.seconds:.0f}s -> {self.out / 'manifest.jsonl'}")


@torch.no_grad()
def sample(sd: SDComponents, ctxb: ContextBuilder, conditioner: TaxonomyConditioner | None, meta: dict,
           lineages: list[dict[str, str]], prompt: str | None, seeds: list[int], cfg: LatentGenerateConfig,
           resolution: int, device: torch.device, bf16: bool) -> list[Image.Image]:
    """Denoise one batch; all guidance branches go through the UNet as one concatenated batch."""
    g = cfg.guidance
    n = len(seeds)
    uncond = g.mode == "cfg" or (g.mode == "taxonomic" and g.cfg_scale is not None)
    branches = ["cond"] + (["uncond"] if uncond else []) + (["ref"] if g.mode == "taxonomic" else [])
    ctxs, pools = [], []
    levels = meta["levels"]
    for b in branches:
        if conditioner is None:
            ctx, pooled = ctxb.prompt([prompt if b == "cond" else "" for _ in range(n)])
        else:
            depths = {"cond": [len(levels)] * n, "uncond": [0] * n,
                      "ref": [reference_depth(lin, levels, g.reference) for lin in lineages]}[b]
            ctx, pooled = ctxb.taxonomy(conditioner, lineages, depths)
        ctxs.append(ctx)
        pools.append(pooled)
    ctx = torch.cat(ctxs)
    pooled = None if pools[0] is None else torch.cat(pools)
    lat = resolution // sd.vae_scale
    sched = make_scheduler(cfg.sampler, sd.scheduler_config)
    sched.set_timesteps(cfg.steps, device=device)
    noise = torch.stack([torch.randn((sd.unet.config.in_channels, lat, lat), generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)
    latents = noise * sched.init_noise_sigma
    kw = unet_kwargs(sd, pooled, resolution, resolution, n * len(branches), device)
    step_gen = torch.Generator(device="cpu").manual_seed(seeds[0])
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(torch.cat([latents] * len(branches)), t)
        with autocast(device, bf16):
            out = sd.unet(x.to(sd.unet.dtype), t, encoder_hidden_states=ctx.to(sd.unet.dtype), **kw).sample.float()
        eps = dict(zip(branches, out.chunk(len(branches)), strict=True))
        if not g.active(i, len(sched.timesteps)):
            eps = eps["cond"]
        elif g.mode == "cfg":
            eps = combine(eps["cond"], eps["uncond"], g.scale)
        else:
            eps = combine(eps["cond"], eps["ref"], g.scale, eps.get("uncond"), g.cfg_scale)
        latents = sched.step(eps, t, latents, generator=step_gen).prev_sample
    with autocast(device, bf16):
        imgs = sd.vae.decode((latents / sd.vae.config.scaling_factor).to(sd.vae.dtype)).sample.float()
    arr = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def generate_latent(model_dir: str | Path, taxon: str, n: int, out_dir: str | Path,
                    config: LatentGenerateConfig | str | Path | dict | None = None, *,
                    sd: SDComponents | None = None, progress: bool = True) -> LatentGenerateResult:
    """Generate indices 0..n-1 of `taxon` (a trained taxon, label or any name in a trained lineage)."""
    cfg = (LatentGenerateConfig() if config is None else LatentGenerateConfig.from_yaml(config)
           if isinstance(config, str | Path) else LatentGenerateConfig.model_validate(config)
           if isinstance(config, dict) else config)
    if n < 1:
        raise SynthgenError(f"the number of images must be at least 1, got {n}")
    model_dir, out = Path(model_dir), Path(out_dir)
    meta_path = model_dir / MODEL_FILE
    if not meta_path.is_file():
        raise SynthgenError(f"{meta_path}: missing; train with `synthgen train` (backend: latent) or it did not finish")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if cfg.guidance.mode == "taxonomic" and meta["method"] != "taxonomy":
        raise SynthgenError(f"{model_dir}: taxonomic guidance needs a taxonomy-conditioned model (this one is {meta['method']}); use guidance mode cfg (--guidance cfg)")
    targets = resolve_targets(model_dir, taxon, even=False)
    resolution = cfg.resolution or meta["resolution"]
    prompt = cfg.prompt or meta.get("prompt")
    settings = {
        "sampler": cfg.sampler, "steps": cfg.steps,
        "guidance": cfg.guidance.record(),
        "model": meta["hash"],
    }
    sub = slug(taxon)
    manifest = out / "manifest.jsonl"
    done: set[int] = set()
    for i, r in enumerate(read_jsonl(manifest), 1):
        if r.get("query", "").lower() != taxon.lower():
            continue
        if any(r.get(k) != v for k, v in settings.items()):
            raise SynthgenError(f"{manifest}:{i}: holds {taxon!r} images made with other settings "
                                f"({r.get('sampler')}, {r.get('steps')} steps, model {r.get('model')}); use another --out")
        if (out / r["file"]).exists():
            done.add(r["index"])
    todo = [i for i in range(n) if i not in done]
    t0, written, n_cut = time.time(), 0, 0
    if todo:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        bf16 = cfg.mixed_precision == "bf16" and device.type == "cuda"
        sd = sd or load_sd(cfg.base_model or meta["base_model"], meta.get("revision"), cfg.local_files_only,
                           meta.get("variant"))
        sd.to(device, torch.bfloat16 if bf16 else torch.float32)
        meta, conditioner = load_trained(model_dir, sd, device)
        enable_memory_savers(sd.unet, False, cfg.xformers)
        if bf16:
            sd.unet.to(dtype=torch.bfloat16)
        ctxb = ContextBuilder(sd, meta["levels"], meta["rank_template"], meta["base_prompt"], device)
        weights = [tg.weight for tg in targets]
        bar = tqdm(total=len(todo), desc=f"generate {taxon} (latent)", unit="img", disable=not progress)
        with JsonlAppender(manifest) as app:
            for start in range(0, len(todo), cfg.batch_size):
                idx = todo[start: start + cfg.batch_size]
                seeds = [image_seed(cfg.seed, taxon, i) for i in idx]
                chosen = [random.Random(s).choices(targets, weights)[0] for s in seeds]
                imgs = sample(sd, ctxb, conditioner, meta, [tg.lineage for tg in chosen], prompt, seeds, cfg,
                              resolution, device, bf16)
                for i, s, tg, img in zip(idx, seeds, chosen, imgs, strict=True):
                    full = f"{sub}/full/{sub}_{i:06d}.png"
                    atomic_save_image(img, out / full)
                    row = {"file": full, "full_image": full, "box": [0, 0, resolution, resolution], "cut": False,
                           "size": resolution, "resolution": resolution}
                    if cfg.cut.enabled:
                        c = cut_instance(img, cfg.cut)
                        if c.ok:
                            chip = f"{sub}/{sub}_{i:06d}.png"
                            atomic_save_image(c.chip, out / chip)
                            row.update(file=chip, box=list(c.box), chip_box=list(c.chip_box), cut=True,
                                       size=c.chip.size[0], mask_area=round(c.area, 4))
                            n_cut += 1
                    app.write({**row, "index": i, "query": taxon, "label": tg.label, "taxon": tg.taxon,
                               "lineage": tg.lineage, "seed": s, "backend": "latent",
                               "prompt": prompt, **settings})
                    written += 1
                bar.update(len(idx))
        bar.close()
    return LatentGenerateResult(out, written, len(done), n_cut, time.time() - t0)


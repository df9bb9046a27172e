"""Train the latent backend: LoRA on a pretrained Stable Diffusion UNet, conditioned on taxonomy
(TaxaDiffusion, progressive over ranks) or on one prompt (DreamBooth-style, one taxon).

The output folder follows the pixel backend's conventions (taxonomy.json, train_config.yaml,
model_card.md, loss.png, safetensors weights) plus latent_model.json, which generation reads.
A kill at any point resumes from the last checkpoint under OUT/checkpoint/ without duplicating
loss rows.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from synthgen.device import autocast, resolve_device
from synthgen.errors import ConfigError, SynthgenError
from synthgen.generator import generator_class, write_index
from synthgen.io_utils import (
    JsonlAppender,
    atomic_save_image,
    atomic_write,
    read_jsonl,
    write_json,
    write_jsonl,
)
from synthgen.latent.conditioning import ContextBuilder, TaxonomyConditioner, unet_kwargs
from synthgen.latent.config import LatentTrainConfig
from synthgen.latent.data import ImageRows, load_rows, resolve_levels, taxa_table
from synthgen.latent.loading import SDComponents, enable_memory_savers, load_sd
from synthgen.latent.weights import add_lora, files_hash, load_lora, load_tensors, lora_state, save_tensors
from synthgen.training import (
    fingerprint,
    optimizer_tensors,
    restore_optimizer,
    resume_state,
    write_checkpoint,
)

LORA_FILE = "lora.safetensors"
COND_FILE = "conditioner.safetensors"
MODEL_FILE = "latent_model.json"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    seconds: float

    def summary(self) -> str:
        return (f"trained latent LoRA: {self.steps} steps, final loss {self.final_loss:.4f}, "
                f"{self.seconds:.0f}s -> {self.out_dir}")


def _stage_steps(cfg: LatentTrainConfig, n_stages: int) -> list[int]:
    s = cfg.steps_per_stage
    if isinstance(s, int):
        return [s] * n_stages
    if len(s) != n_stages:
        raise ConfigError(f"steps_per_stage has {len(s)} entries but training has {n_stages} stages (one per level)")
    return list(s)


def _endless(loader):
    while True:
        yield from loader


def _depths(stage_levels: int, n: int, cfg: LatentTrainConfig, rng: random.Random) -> list[int]:
    """Per-sample number of ranks to condition on: all active ranks, none (CFG) or a coarser cut."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < cfg.cond_dropout:
            out.append(0)
        elif stage_levels > 1 and u < cfg.cond_dropout + cfg.level_dropout:
            out.append(rng.randint(1, stage_levels - 1))
        else:
            out.append(stage_levels)
    return out


def build_trainable(sd: SDComponents, cfg: LatentTrainConfig, levels: list[str], device: torch.device,
                    bf16: bool) -> TaxonomyConditioner | None:
    """Add the LoRA (fp32 params even when the frozen UNet runs in bf16) and the rank modules."""
    if bf16:
        sd.unet.to(dtype=torch.bfloat16)
    add_lora(sd.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    for p in sd.unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.method != "taxonomy":
        return None
    dim = sd.unet.config.cross_attention_dim
    return TaxonomyConditioner(levels, dim, cfg.conditioner.hidden).to(device)


def _loss(sd, noise_sched, latents, ctx, pooled, cfg, device, gen) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=gen, device="cpu").to(device)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = noise_sched.add_noise(latents, noise, t)
    target = noise_sched.get_velocity(latents, noise, t) if noise_sched.config.prediction_type == "v_prediction" else noise
    h, w = latents.shape[-2] * sd.vae_scale, latents.shape[-1] * sd.vae_scale
    kw = unet_kwargs(sd, pooled, h, w, latents.shape[0], device)
    pred = sd.unet(noisy.to(sd.unet.dtype), t, encoder_hidden_states=ctx.to(sd.unet.dtype), **kw).sample
    if cfg.snr_gamma is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t)
    weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if noise_sched.config.prediction_type == "v_prediction" else snr)
    per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per * weight).mean()


def _plot_loss(rows: list[dict], path: Path, stages: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=0.8)
    for b in [sum(stages[: i + 1]) for i in range(len(stages) - 1)]:
        ax.axvline(b, color="grey", ls="--", lw=0.6)
    ax.set(xlabel="step", ylabel="loss", title="latent LoRA training loss (dashed: stage boundaries)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _model_card(cfg: LatentTrainConfig, meta: dict, n_images: int, result: TrainResult) -> str:
    taxa = ", ".join(sorted(meta["taxa"])) or "-"
    cond = (f"TaxaDiffusion-style taxonomy conditioning over levels {meta['levels']} "
            f"({len(meta['levels'])} progressive stages)" if cfg.method == "taxonomy"
            else f"DreamBooth-style LoRA with the prompt \"{meta['prompt']}\"")
    return f"""# synthgen latent model

- Backend: latent (Stable Diffusion {meta['family'].upper()} + LoRA), base model `{cfg.base_model}`
- Method: {cond}
- LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {cfg.lora.targets}
- Resolution: {cfg.resolution}; training images: {n_images} (split `{cfg.split}`); taxa: {taxa}
- Steps: {result.steps}; final loss {result.final_loss:.4f}; {result.seconds:.0f}s
- Weights: `{LORA_FILE}`{f" and `{COND_FILE}` (per-rank modules)" if cfg.method == "taxonomy" else ""}, safetensors

Why: pretrained Stable Diffusion gives realistic texture and light; the LoRA and the small
per-rank modules adapt it to these taxa at a fraction of full fine-tuning's cost. The base
weights are not stored here: generation loads `{cfg.base_model}` (or `base_model` in the
generate config) and applies these files.

Generate: `synthgen generate --model THIS_FOLDER --taxon NAME --n 100 --out POOL`
"""


def train_latent(config: LatentTrainConfig | str | Path | dict, data_dir: str | Path | None, out_dir: str | Path,
                 *, sd: SDComponents | None = None, progress: bool = True) -> TrainResult:
    """Train a LoRA (+ per-rank modules) and write the model folder; resumes from OUT/checkpoint/.

    `data_dir`: a chips folder (or an image folder for dreambooth); None takes `chips:` from the config.
    """
    cfg = (LatentTrainConfig.from_yaml(config) if isinstance(config, str | Path)
           else LatentTrainConfig.model_validate(config) if isinstance(config, dict) else config)
    data_dir = data_dir or cfg.chips
    if data_dir is None:
        raise ConfigError("no training data: pass --chips DIR or set `chips:` in the train config")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    if out_dir.resolve() == data_dir or data_dir in out_dir.resolve().parents:
        raise SynthgenError(f"{out_dir}: the output folder must not be inside the training data {data_dir}")
    if (out_dir / MODEL_FILE).is_file():
        meta = json.loads((out_dir / MODEL_FILE).read_text(encoding="utf-8"))
        return TrainResult(out_dir, meta["steps"], meta["final_loss"], meta["seconds"])
    out_dir.mkdir(parents=True, exist_ok=True)

    db = cfg.dreambooth
    rows = load_rows(data_dir, cfg.split, db.taxon if cfg.method == "dreambooth" else None, db.label)
    levels = resolve_levels(rows, data_dir, cfg.levels) if cfg.method == "taxonomy" else []
    n_stages = max(1, len(levels))
    stage_steps = _stage_steps(cfg, n_stages)
    total = sum(stage_steps)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    bf16 = cfg.mixed_precision == "bf16" and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    sd = sd or load_sd(cfg.base_model, cfg.revision, cfg.local_files_only, cfg.variant)
    sd.to(device, torch.bfloat16 if bf16 else torch.float32)
    class_batches = None
    if cfg.method == "dreambooth" and db.num_class_images:
        class_rows = make_class_images(sd, cfg, out_dir / "class_images", device, bf16, progress)
        class_batches = _endless(torch.utils.data.DataLoader(
            ImageRows(out_dir / "class_images", class_rows, cfg.resolution, cfg.hflip), batch_size=cfg.batch_size,
            shuffle=True, generator=torch.Generator().manual_seed(cfg.seed + 1)))
    conditioner = build_trainable(sd, cfg, levels, device, bf16)
    enable_memory_savers(sd.unet, cfg.gradient_checkpointing, cfg.xformers)
    sd.unet.train()
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(sd.scheduler_config)
    ctxb = ContextBuilder(sd, levels, cfg.conditioner.rank_template, cfg.conditioner.base_prompt, device)
    lineages = [r.get("lineage") or {} for r in rows]
    if conditioner is not None:
        ctxb.ensure(lineages)

    ds = ImageRows(data_dir, rows, cfg.resolution, cfg.hflip)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) >= cfg.batch_size,
                                         num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    batches = _endless(loader)

    ckpt_dir = out_dir / "checkpoint"
    fp = _fingerprint(cfg, data_dir)
    state_meta = resume_state(ckpt_dir, fp) or {}
    start_step = state_meta.get("step", 0)
    log_path = out_dir / "loss.jsonl"
    kept = [r for r in read_jsonl(log_path) if r["step"] <= start_step]
    write_jsonl(log_path, kept)

    gen = torch.Generator().manual_seed(cfg.seed + start_step)
    rng = random.Random(cfg.seed + start_step)
    t0 = time.time() - state_meta.get("seconds", 0.0)
    step, last_loss = start_step, float("nan")
    bar = tqdm(total=total, initial=start_step, desc="latent LoRA", disable=not progress)
    with JsonlAppender(log_path) as log:
        for stage in range(n_stages):
            stage_end = sum(stage_steps[: stage + 1])
            if step >= stage_end:
                continue
            params = [{"params": [p for p in sd.unet.parameters() if p.requires_grad], "lr": cfg.lr}]
            if conditioner is not None:
                first = stage if cfg.conditioner.freeze_previous else 0
                for r, mod in enumerate(conditioner.ranks):
                    mod.requires_grad_(first <= r <= stage)
                params.append({"params": [p for r in conditioner.ranks[first: stage + 1] for p in r.parameters()],
                               "lr": cfg.conditioner_lr or cfg.lr})
            opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
            if start_step and step == start_step:
                tensors = load_tensors(ckpt_dir / "state.safetensors")
                _load_trainable(sd, conditioner, tensors)
                if state_meta.get("stage") == stage:
                    restore_optimizer(opt, tensors, state_meta["optimizer"], prefix="optim.")
            bar.set_description(f"latent LoRA stage {stage + 1}/{n_stages}"
                                + (f" ({levels[stage]})" if levels else ""))
            while step < stage_end:
                opt.zero_grad(set_to_none=True)
                acc = 0.0
                for _ in range(cfg.grad_accum):
                    x, idx = next(batches)
                    x = x.to(device)
                    with torch.no_grad(), autocast(device, bf16):
                        latents = sd.vae.encode(x.to(sd.vae.dtype)).latent_dist.sample() * sd.vae.config.scaling_factor
                    latents = latents.float()
                    depths = _depths(stage + 1, len(idx), cfg, rng)
                    with autocast(device, bf16):
                        if conditioner is not None:
                            ctx, pooled = ctxb.taxonomy(conditioner, [lineages[i] for i in idx.tolist()], depths)
                        else:
                            ctx, pooled = ctxb.prompt([db.prompt if d else "" for d in depths])
                        loss = _loss(sd, noise_sched, latents, ctx, pooled, cfg, device, gen) / cfg.grad_accum
                        if class_batches is not None:
                            xc, _ = next(class_batches)
                            with torch.no_grad():
                                lc = sd.vae.encode(xc.to(device, sd.vae.dtype)).latent_dist.sample().float()
                            cctx, cpooled = ctxb.prompt([db.class_prompt] * len(xc))
                            loss = loss + db.prior_weight * _loss(sd, noise_sched, lc * sd.vae.config.scaling_factor,
                                                                  cctx, cpooled, cfg, device, gen) / cfg.grad_accum
                    loss.backward()
                    acc += float(loss.detach())
                if not math.isfinite(acc):
                    raise SynthgenError(f"loss became {acc} at step {step + 1}; lower lr (now {cfg.lr}) or disable bf16")
                torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
                opt.step()
                step += 1
                last_loss = acc
                log.write({"step": step, "stage": stage + 1, "loss": acc, "seconds": round(time.time() - t0, 3)})
                bar.update(1)
                bar.set_postfix(loss=f"{acc:.4f}")
                if step % cfg.checkpoint_every == 0 and step < total:
                    _checkpoint(ckpt_dir, sd, conditioner, opt, step, stage, time.time() - t0, fp)
    bar.close()

    result = TrainResult(out_dir, step, last_loss, time.time() - t0)
    _finalize(cfg, sd, conditioner, data_dir, out_dir, rows, levels, stage_steps, result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def make_class_images(sd: SDComponents, cfg: LatentTrainConfig, folder: Path, device: torch.device, bf16: bool,
                      progress: bool) -> list[dict]:
    """DreamBooth prior-preservation images from the base model (before the LoRA); resumable."""
    from synthgen.latent.config import LatentGenerateConfig
    from synthgen.latent.generate import sample

    db = cfg.dreambooth
    if not db.class_prompt:
        raise ConfigError("dreambooth.num_class_images > 0 needs dreambooth.class_prompt (e.g. \"a photo of a seal\")")
    ctxb = ContextBuilder(sd, [], cfg.conditioner.rank_template, cfg.conditioner.base_prompt, device)
    gcfg = LatentGenerateConfig(steps=db.class_steps, sampler="dpm++", guidance={"mode": "cfg", "scale": 7.5})
    todo = [i for i in range(db.num_class_images) if not (folder / f"class_{i:05d}.png").is_file()]
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc="class images", disable=not progress or not todo):
        idx = todo[start: start + cfg.batch_size]
        imgs = sample(sd, ctxb, None, {"levels": []}, [{}] * len(idx), db.class_prompt,
                      [cfg.seed * 100003 + i for i in idx], gcfg, cfg.resolution, device, bf16)
        for i, img in zip(idx, imgs, strict=True):
            atomic_save_image(img, folder / f"class_{i:05d}.png")
    return [{"file": f"class_{i:05d}.png"} for i in range(db.num_class_images)]


def _trainable_tensors(sd: SDComponents, conditioner: TaxonomyConditioner | None) -> dict[str, torch.Tensor]:
    t = {f"lora.{k}": v for k, v in lora_state(sd.unet).items()}
    if conditioner is not None:
        t.update({f"cond.{k}": v for k, v in conditioner.state_dict().items()})
    return t


def _load_trainable(sd: SDComponents, conditioner: TaxonomyConditioner | None, tensors: dict) -> None:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(sd.unet, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    if conditioner is not None:
        conditioner.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("cond.")})


def _fingerprint(cfg: LatentTrainConfig, data_dir: Path) -> str:
    """What must match for a checkpoint to be resumed (device and memory options may change)."""
    skip = {"device", "threads", "chips", "mixed_precision", "gradient_checkpointing", "xformers", "num_workers", "checkpoint_every"}
    return fingerprint({"data_dir": str(data_dir), **cfg.model_dump(mode="json", exclude=skip)})


def _checkpoint(ckpt_dir: Path, sd, conditioner, opt, step: int, stage: int, seconds: float, fp: str) -> None:
    """Trainable weights + optimizer state, written as one folder (training.write_checkpoint)."""
    tensors, opt_meta = optimizer_tensors(opt, prefix="optim.")
    tensors.update(_trainable_tensors(sd, conditioner))
    write_checkpoint(ckpt_dir, {"state.safetensors": tensors},
                     {"step": step, "stage": stage, "seconds": seconds, "optimizer": opt_meta, "fingerprint": fp})


def _finalize(cfg, sd, conditioner, data_dir: Path, out_dir: Path, rows, levels, stage_steps, result) -> None:
    """Write weights, taxonomy, config, card and loss plot; latent_model.json last (marks 'done')."""
    save_tensors(out_dir / LORA_FILE, lora_state(sd.unet),
                 metadata={"format": "peft", "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha),
                           "targets": json.dumps(cfg.lora.targets), "base_model": cfg.base_model})
    files = [out_dir / LORA_FILE]
    if conditioner is not None:
        save_tensors(out_dir / COND_FILE, conditioner.state_dict(),
                     metadata={"levels": json.dumps(levels), "dim": str(conditioner.dim), "hidden": str(conditioner.hidden)})
        files.append(out_dir / COND_FILE)
    taxa = taxa_table(rows)
    if cfg.method == "dreambooth" and not taxa:
        taxa = {cfg.dreambooth.taxon or "instance": {"label": cfg.dreambooth.label or cfg.dreambooth.taxon,
                                                    "lineage": {}, "count": len(rows)}}
    src_tax = data_dir / "taxonomy.json"
    if src_tax.is_file():  # image folders (DreamBooth) have none; taxon_counts.json holds the lineages
        with atomic_write(out_dir / "taxonomy.json", "w", encoding="utf-8") as f:
            f.write(src_tax.read_text(encoding="utf-8"))
    write_json(out_dir / "taxon_counts.json", taxa)
    with atomic_write(out_dir / "train_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
    _plot_loss(read_jsonl(out_dir / "loss.jsonl"), out_dir / "loss.png", stage_steps)
    meta = {
        "backend": "latent", "method": cfg.method, "base_model": cfg.base_model, "revision": cfg.revision, "variant": cfg.variant,
        "family": sd.family, "resolution": cfg.resolution, "levels": levels,
        "rank_template": cfg.conditioner.rank_template, "base_prompt": cfg.conditioner.base_prompt,
        "prompt": cfg.dreambooth.prompt if cfg.method == "dreambooth" else None,
        "lora": cfg.lora.model_dump(), "conditioner_hidden": cfg.conditioner.hidden,
        "taxa": sorted(taxa), "stage_steps": stage_steps, "steps": result.steps,
        "final_loss": result.final_loss, "seconds": result.seconds, "hash": files_hash(files),
        "data_dir": str(data_dir),
    }
    with atomic_write(out_dir / "model_card.md", "w", encoding="utf-8") as f:
        f.write(_model_card(cfg, meta, len(rows), result))
    write_json(out_dir / MODEL_FILE, meta)
    write_index(out_dir, "latent", generator_class("latent"))


def load_trained(model_dir: Path, sd: SDComponents, device: torch.device) -> tuple[dict, TaxonomyConditioner | None]:
    """Apply a trained folder's LoRA to `sd.unet` and rebuild its per-rank modules."""
    meta_path = model_dir / MODEL_FILE
    if not meta_path.is_file():
        raise SynthgenError(f"{model_dir}: not a finished latent model folder (no {MODEL_FILE})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    lo = meta["lora"]
    add_lora(sd.unet, lo["rank"], lo["alpha"], 0.0, lo["targets"])
    load_lora(sd.unet, model_dir / LORA_FILE)
    conditioner = None
    if meta["method"] == "taxonomy":
        conditioner = TaxonomyConditioner(meta["levels"], sd.unet.config.cross_attention_dim, meta["conditioner_hidden"])
        state = load_tensors(model_dir / COND_FILE)
        try:
            conditioner.load_state_dict(state)
        except RuntimeError as e:
            raise SynthgenError(f"{model_dir / COND_FILE}: does not match the base model ({str(e)[:200]})") from e
        conditioner.to(device).eval()
    sd.unet.to(device)
    return meta, conditioner

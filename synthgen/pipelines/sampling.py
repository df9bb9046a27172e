"""The guided sampling loop.

Faster than a stock diffusers pipeline loop because: the taxonomy vectors of target and reference
are computed once, not every step; both passes are one batched forward; DDIM's update uses
pre-computed per-step coefficients (no scheduler.step bookkeeping); channels_last + inference_mode;
outside the guidance window only the target half is evaluated; bf16 autocast (and optionally
torch.compile) on CUDA. With `cache_interval` k > 1 it also reuses deep features (DeepCache, Ma et al.
2023): every k-th step runs the whole UNet and keeps the input of its last (full-resolution) up block;
the steps between run only conv_in, the first down block's resnets, that up block and the output head
on the kept features. Same number of sampler steps; the images deviate a little from exact sampling
(benchmarks/generation_speed.py measures by how much).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel

from synthgen.device import autocast
from synthgen.errors import SynthgenError
from synthgen.generator import read_index
from synthgen.guidance import GuidanceConfig, combine
from synthgen.models import ConditionedUNet
from synthgen.models.delta import load_model_folder
from synthgen.models.prediction import eps_and_x0
from synthgen.schedulers import make_scheduler, read_scheduler_config

SAMPLERS = ("ddim", "dpm", "euler")  # the samplers this loop steps (others need per-step randomness)
_SHALLOW_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_SHALLOW_UP = ("UpBlock2D", "AttnUpBlock2D")


def cache_support(unet: UNet2DModel) -> str | None:
    """Why `unet` cannot run the cached shallow path, or None when it can (every synthgen preset can)."""
    if len(unet.down_blocks) < 2:
        return "a UNet with a single resolution has no deep features to reuse"
    if unet.config.time_embedding_type != "positional":
        return f"time_embedding_type {unet.config.time_embedding_type!r} (only positional)"
    first, last = type(unet.down_blocks[0]).__name__, type(unet.up_blocks[-1]).__name__
    if first not in _SHALLOW_DOWN or last not in _SHALLOW_UP:
        return f"blocks {first} / {last} (supported: {', '.join(_SHALLOW_DOWN + _SHALLOW_UP)})"
    if len(unet.up_blocks[-1].resnets) != len(unet.down_blocks[0].resnets) + 1:
        return "the last up block does not take exactly conv_in + the first down block's resnets as skips"
    return None


def deep_forward(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet2DModel's own forward, plus the input of its last up block (the features to reuse)."""
    kept = []
    hook = unet.up_blocks[-1].register_forward_pre_hook(lambda _m, args: kept.append(args[0]))
    try:
        out = unet(x, t, class_labels=class_emb).sample
    finally:
        hook.remove()
    return out, kept[0]


def shallow_forward(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor,
                    deep: torch.Tensor) -> torch.Tensor:
    """The full-resolution path of UNet2DModel.forward (diffusers 0.42) with `deep` standing in for
    everything below it: the first down block's downsampler, deeper blocks and the mid block are skipped."""
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    ts = t.reshape(-1).to(x.device) * torch.ones(x.shape[0], dtype=t.dtype, device=x.device)
    emb = unet.time_embedding(unet.time_proj(ts).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_emb).to(dtype=unet.dtype)
    h = unet.conv_in(x)
    skips = (h,)
    block = unet.down_blocks[0]
    for k, resnet in enumerate(block.resnets):
        h = resnet(h, emb)
        if hasattr(block, "attentions"):
            h = block.attentions[k](h)
        skips += (h,)
    h = unet.up_blocks[-1](deep, skips, emb)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def load_model(folder: str | Path, device: torch.device) -> tuple[ConditionedUNet, dict]:
    """Model in eval mode on `device` + its scheduler config, from a complete (indexed) model folder
    of `synthgen train` or `train --add-taxa`."""
    read_index(folder)
    model = load_model_folder(folder).eval().to(device)
    model.unet.to(memory_format=torch.channels_last)
    return model, read_scheduler_config(folder)


class GuidedSampler:
    """Turns per-image noise + target/reference codes into images with guidance.

    cache_interval 1 is exact; k > 1 runs the whole UNet on steps 0, k, 2k, ... (and whenever the
    guidance window opens or closes, since the kept features then have the wrong batch) and the
    shallow path on the others. torch.compile, when asked for, applies to the exact sampler only.
    """

    def __init__(self, model: ConditionedUNet, sched_config: dict, sampler: str = "ddim", steps: int = 25,
                 compile: bool = False, cache_interval: int = 1):
        if cache_interval < 1:
            raise SynthgenError(f"cache_interval must be >= 1 (1 = exact), got {cache_interval}")
        if cache_interval > 1 and (why := cache_support(model.unet)):
            raise SynthgenError(f"cache_interval {cache_interval} is not available for this UNet: {why}")
        self.model, self.sampler, self.steps, self.cache_interval = model, sampler, steps, cache_interval
        self.device = next(model.parameters()).device
        self.sched = make_scheduler(sampler, sched_config, SAMPLERS)
        compile = compile and cache_interval == 1 and self.device.type == "cuda"
        self.unet = torch.compile(model.unet) if compile else model.unet
        self.clip = bool(sched_config.get("clip_sample", True))
        self.prediction_type = sched_config.get("prediction_type", "epsilon")

    @torch.inference_mode()
    def __call__(self, noise: torch.Tensor, codes: torch.Tensor, ref_codes: torch.Tensor,
                 guidance: GuidanceConfig, context: torch.Tensor | None = None) -> torch.Tensor:
        """noise [B,3,S,S] (any device), codes/ref_codes [B,L] -> uint8 images [B,S,S,3] on CPU.
        In-context models also take `context` [B,C,S,S] (masked window + hole), fed at every step."""
        dev, b = self.device, noise.shape[0]
        if (context is None) != (self.model.context_channels == 0):
            raise SynthgenError(f"this model takes {self.model.context_channels} context channels; "
                                f"{'none' if context is None else context.shape[1]} given")
        if context is not None:
            context = context.to(dev)
            context2 = torch.cat([context, context])
        sched = self.sched
        sched.set_timesteps(self.steps, device=dev)
        x = (noise.to(dev) * sched.init_noise_sigma).contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            emb = self.model.encoder(torch.cat([codes, ref_codes]).to(dev))
        emb_target = emb[:b]
        timesteps = sched.timesteps
        n = len(timesteps)
        ddim = self.sampler == "ddim"
        if ddim:  # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, coefficients pre-computed
            ac = sched.alphas_cumprod.to(dev)
            prev = timesteps - sched.config.num_train_timesteps // self.steps
            a_t = ac[timesteps]
            a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], sched.final_alpha_cumprod.to(dev))
            coef = [(a, p.sqrt(), (1 - p).sqrt()) for a, p in zip(a_t, a_prev, strict=True)]
        deep, deep_guided = None, None
        for i, t in enumerate(timesteps):
            xin = x if ddim else sched.scale_model_input(x, t)
            guided = guidance.active(i, n)
            inp, cond = (torch.cat([xin, xin]), emb) if guided else (xin, emb_target)
            if context is not None:
                inp = torch.cat([inp, context2 if guided else context], 1)
            with autocast(dev):
                if self.cache_interval == 1:
                    out = self.unet(inp, t, class_labels=cond).sample
                elif i % self.cache_interval == 0 or guided != deep_guided:
                    out, deep = deep_forward(self.unet, inp, t, cond)
                    deep_guided = guided
                else:
                    out = shallow_forward(self.unet, inp, t, cond, deep)
            out = out.float()
            pred = combine(out[:b], out[b:], guidance.scale) if guided else out
            if ddim:
                a, sp, s1p = coef[i]
                eps, x0 = eps_and_x0(pred, x, a, self.prediction_type)
                if self.clip:
                    x0 = x0.clamp(-1, 1)
                x = sp * x0 + s1p * eps
            else:
                x = sched.step(pred, t, x, return_dict=False)[0]
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

"""Progressive / flat training loop with EMA, accumulation, clipping and exact resume.

Every random draw of step s comes from generators seeded by (seed, step, process), so a run
resumed from a checkpoint takes exactly the batches, noise and dropout the uninterrupted run would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from synthgen.errors import SynthgenError
from synthgen.generator import INDEX_FILE, generator_class, write_index
from synthgen.incontext.windows import WindowSet, load_windows
from synthgen.io_utils import atomic_write, write_json
from synthgen.models import ConditionedUNet, TaxonVocab
from synthgen.models.prediction import training_target
from synthgen.train.config import TrainConfig
from synthgen.train.data import ChipSet, load_chips
from synthgen.training import (
    EMA,
    fingerprint,
    latest_checkpoint,
    make_accelerator,
    optimizer_tensors,
    prune_checkpoints,
    restore_optimizer,
    resume_state,
    seeded_generator,
    set_lr,
    warmup_cosine,
    write_checkpoint,
)

TrainData = ChipSet | WindowSet


def load_training_data(cfg: TrainConfig, chips: str | Path | None = None, progress: bool = True) -> TrainData:
    """The examples of the config's backend: whole chips (pixel) or tile windows with holes (incontext)."""
    if cfg.backend == "incontext":
        if cfg.data is None:
            raise SynthgenError("no dataset: set `data:` (a data.yaml) in the incontext train config or pass --data")
        if cfg.window.size != cfg.image_size:
            raise SynthgenError(f"window.size {cfg.window.size} must equal image_size {cfg.image_size}")
        return load_windows(Path(chips) if chips else cfg.data, cfg.taxonomy, cfg.window, cfg.split, progress)
    chips_dir = Path(chips) if chips else cfg.chips
    if chips_dir is None:
        raise SynthgenError("no chips folder: set `chips:` in the train config or pass --chips")
    return load_chips(chips_dir, cfg.image_size, cfg.split)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, snr: torch.Tensor,
                   gamma: float | None, prediction_type: str) -> torch.Tensor:
    """MSE over the pixels that are real (weight 1; padding 0), each sample weighted by Min-SNR-gamma
    when asked: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al. 2023)."""
    err = (pred - target).pow(2)
    if weight is None:
        per = err.mean(dim=(1, 2, 3))
    else:
        w = weight.expand_as(err)
        per = (err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp(min=1)
    if gamma is not None:
        per = per * snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr.clamp(min=1e-8))
    return per.mean()


def noise_scheduler(cfg: TrainConfig) -> DDPMScheduler:
    """The training noise schedule, saved with the model; samplers are built from its config."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type,
                         # sampling starts at the last timestep (zero SNR) only where v makes that work
                         timestep_spacing="trailing" if cfg.prediction_type == "v_prediction" else "leading")


@dataclass
class Stage:
    index: int
    max_level: int  # levels 0..max_level are conditioned, finer ones forced to none
    new_levels: list[int]  # tables first trained in this stage
    steps: int
    lr: float
    train: list[str]


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float


def plan_stages(cfg: TrainConfig, vocab: TaxonVocab, lineages: list[dict[str, str]]) -> list[Stage]:
    """Progressive: one stage per informative level (more than one value in the data) plus the finest
    level; constant levels join the next stage. Flat: one stage with every level."""
    n = len(vocab.levels)
    if cfg.mode == "flat":
        ends = [n - 1]
    else:
        distinct = [len({lin.get(lv) for lin in lineages}) for lv in vocab.levels]
        ends = [i for i in range(n) if distinct[i] > 1 or i == n - 1]
    stages, prev = [], -1
    for k, end in enumerate(ends):
        o = cfg.stages[k] if k < len(cfg.stages) else None
        stages.append(
            Stage(
                index=k,
                max_level=end,
                new_levels=list(range(prev + 1, end + 1)),
                steps=(o.steps if o and o.steps is not None else cfg.steps_per_stage),
                lr=(o.lr if o and o.lr is not None else cfg.lr),
                train=(o.train if o and o.train is not None else (["all"] if cfg.mode == "flat" else cfg.train_parts)),
            )
        )
        prev = end
    return stages


def drop_conditions(codes: torch.Tensor, max_level: int, p_uncond: float, p_drop: float, g: torch.Generator) -> torch.Tensor:
    """Force levels > max_level to none; then per sample: all none with p_uncond, else with p_drop
    cut at a depth drawn uniformly among the sample's defined levels (that level and finer -> none)."""
    codes = codes.clone()
    codes[:, max_level + 1 :] = 0
    b, n = codes.shape
    u = torch.rand(b, generator=g)
    cut = torch.full((b,), n, dtype=torch.long)
    cut[u < p_uncond] = 0
    drop = (u >= p_uncond) & (u < p_uncond + (1 - p_uncond) * p_drop)
    defined = codes != 0
    for i in torch.nonzero(drop).flatten().tolist():
        depths = torch.nonzero(defined[i]).flatten()
        if len(depths):
            cut[i] = depths[torch.randint(len(depths), (1,), generator=g)].item()
    codes[torch.arange(n)[None, :] >= cut[:, None]] = 0
    return codes


def _params(model: ConditionedUNet, parts: list[str], stage: Stage) -> list[torch.nn.Parameter]:
    enc = model.encoder
    if "all" in parts:
        return list(model.parameters())
    ps: list[torch.nn.Parameter] = []
    if "unet" in parts:
        ps += list(model.unet.parameters())
    if "mlp" in parts and enc.mlp is not None:
        ps += list(enc.mlp.parameters())
    for i, table in enumerate(enc.tables):
        if ("new" in parts and i in stage.new_levels) or ("previous" in parts and i < min(stage.new_levels)):
            ps += list(table.parameters())
    if not ps:
        raise SynthgenError(f"stage {stage.index + 1} trains nothing: train parts {parts}")
    return ps


def _fingerprint(cfg: TrainConfig, vocab: TaxonVocab, n: int) -> str:
    key = {"preset": cfg.preset, "size": cfg.image_size, "mlp": cfg.mlp, "vocab": vocab.to_dict(), "n": n}
    if cfg.backend != "pixel":  # keys added later leave the fingerprints of existing pixel runs unchanged
        key |= {"backend": cfg.backend, "window": cfg.window.model_dump()}
    return fingerprint(key)


def _losses_csv(losses: list[dict]) -> str:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=["step", "stage", "level", "loss", "lr"])
    w.writeheader()
    w.writerows(losses)
    return f.getvalue()


def _write_losses(path: Path, losses: list[dict]) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        f.write(_losses_csv(losses))


def _read_losses(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {"step": int(r["step"]), "stage": int(r["stage"]), "level": r["level"], "loss": float(r["loss"]), "lr": float(r["lr"])}
            for r in csv.DictReader(f)
        ]


def _plot_losses(losses: list[dict], path: Path, prediction_type: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    if losses:
        steps, vals = [r["step"] for r in losses], [r["loss"] for r in losses]
        k = max(1, len(vals) // 50)
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, vals, alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        for r0, r1 in zip(losses, losses[1:], strict=False):
            if r1["stage"] != r0["stage"]:
                ax.axvline(r1["step"], color="gray", ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"MSE ({'v' if prediction_type == 'v_prediction' else 'eps'})")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _model_card(cfg: TrainConfig, chips: TrainData, stages: list[Stage], vocab: TaxonVocab, losses: list[dict], seconds: float) -> str:
    counts = Counter(chips.taxa)
    lines = [
        "# synthgen taxonomy-conditioned diffusion model",
        "",
        f"- backend: {cfg.backend}, preset `{cfg.preset}`, {cfg.image_size} px, mode `{cfg.mode}`",
        f"- data: {len(chips.taxa)} {'windows' if cfg.backend == 'incontext' else 'chips'} from `{chips.root}` "
        f"(split `{cfg.split}`), {len(counts)} taxa",
        f"- levels: {', '.join(vocab.levels)}",
        f"- steps: {sum(s.steps for s in stages)} in {len(stages)} stage(s), batch {cfg.batch_size} x accum {cfg.grad_accum}",
        f"- wall time of the last session: {seconds / 60:.1f} min",
        "",
        "| stage | up to level | steps | lr | trains | mean loss (last 10%) |",
        "|---|---|---|---|---|---|",
    ]
    for s in stages:
        ls = [r["loss"] for r in losses if r["stage"] == s.index]
        tail = ls[-max(1, len(ls) // 10) :] if ls else []
        mean = f"{sum(tail) / len(tail):.4f}" if tail else "-"
        lines.append(f"| {s.index + 1} | {vocab.levels[s.max_level]} | {s.steps} | {s.lr:g} | {', '.join(s.train)} | {mean} |")
    lines += ["", "| taxon | training chips |", "|---|---|"]
    lines += [f"| {t} | {c} |" for t, c in counts.most_common()]
    return "\n".join(lines) + "\n"


def _model_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in [folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "taxonomy_encoder.safetensors"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def train(cfg: TrainConfig, out: str | Path, chips: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Run (or resume) every stage, checkpointing atomically, then write the model folder to `out`."""
    from synthgen.device import resolve_device

    out = Path(out)
    data = load_training_data(cfg, chips, progress)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    acc = make_accelerator(device, cfg.grad_accum)
    vocab = TaxonVocab.from_lineages(data.lineages)
    codes_all = torch.tensor([vocab.encode(lin) for lin in data.lineages], dtype=torch.long)
    stages = plan_stages(cfg, vocab, data.lineages)
    bounds = [0]
    for s in stages:
        bounds.append(bounds[-1] + s.steps)
    total = bounds[-1]
    fp = _fingerprint(cfg, vocab, len(data.taxa))

    torch.manual_seed(cfg.seed)
    model = ConditionedUNet.create(cfg.preset, cfg.image_size, vocab, cfg.mlp, context_channels=data.context_channels)
    ema = EMA(model, cfg.ema_decay)
    noise_sched = noise_scheduler(cfg)
    alphas = noise_sched.alphas_cumprod.to(acc.device)
    snr = alphas / (1 - alphas)

    ckdir = out / "checkpoints"
    step, losses, opt_state, ck_stage = 0, [], None, 0
    if (out / "synthgen_model.json").exists() and json.loads((out / "synthgen_model.json").read_text())["steps"] >= total:
        meta = json.loads((out / "synthgen_model.json").read_text())
        if not (out / INDEX_FILE).exists():  # finished before folders had an index: add it (upgrade)
            write_index(out, cfg.backend, generator_class(cfg.backend))
        acc.print(f"already trained: {out} ({meta['steps']} steps)")
        return TrainResult(out, meta["steps"], meta.get("final_loss", float("nan")), 0.0)
    last = latest_checkpoint(ckdir)
    if last is not None:
        state = resume_state(last, fp)
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        ema.shadow = load_file(str(last / "ema.safetensors"))
        opt_state = (load_file(str(last / "optimizer.safetensors")), json.loads((last / "optimizer.json").read_text()))
        torch.set_rng_state(load_file(str(last / "rng.safetensors"))["torch"])
        step, losses, ck_stage = state["step"], _read_losses(last / "losses.csv"), state["stage"]
        if not (ck_stage < len(stages) and bounds[ck_stage] < step <= bounds[ck_stage + 1]):
            # lengthening a run is fine, but only where the stages before the checkpoint keep their steps
            raise SynthgenError(
                f"{last}: written at step {step} in stage {ck_stage + 1}, which this config places elsewhere "
                f"(stage ends: {bounds[1:]}); to train longer, lengthen only the checkpoint's stage or later "
                f"ones (`stages:` overrides), or use a new --out"
            )
        acc.print(f"resuming from {last} (step {step}/{total})")

    model.to(acc.device)
    model.unet.to(memory_format=torch.channels_last)
    pmodel = acc.prepare(model)
    ema.shadow = {k: v.to(acc.device) for k, v in ema.shadow.items()}
    t0, run_loss, run_n = time.time(), 0.0, 0
    bar = tqdm(total=total, initial=step, disable=not (progress and acc.is_main_process), desc="train", unit="step")

    def save_checkpoint(opt: torch.optim.Optimizer) -> None:
        if not acc.is_main_process:
            return
        ts, meta = optimizer_tensors(opt)
        tensors = {"model.safetensors": acc.unwrap_model(pmodel).state_dict(), "ema.safetensors": ema.shadow,
                   "optimizer.safetensors": ts, "rng.safetensors": {"torch": torch.get_rng_state()}}
        write_checkpoint(ckdir / f"step-{step:07d}", tensors, {"step": step, "stage": stage.index, "fingerprint": fp},
                         {"optimizer.json": json.dumps(meta), "losses.csv": _losses_csv(losses)})
        prune_checkpoints(ckdir, cfg.keep_checkpoints)

    for stage in stages:
        if step >= bounds[stage.index + 1]:
            continue
        params = _params(acc.unwrap_model(pmodel), stage.train, stage)
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=cfg.weight_decay)
        if opt_state is not None and ck_stage == stage.index:  # a stage-end checkpoint's moments stay behind
            restore_optimizer(opt, *opt_state)
        opt_state = None
        opt = acc.prepare_optimizer(opt)
        level_name = vocab.levels[stage.max_level]
        bar.set_description(f"stage {stage.index + 1}/{len(stages)} ({level_name})")
        while step < bounds[stage.index + 1]:
            lr = warmup_cosine(stage.lr, step - bounds[stage.index], stage.steps, cfg.warmup_steps)
            set_lr(opt, lr)
            for micro in range(cfg.grad_accum):
                g = seeded_generator(cfg.seed, step, micro, acc.process_index)
                idx = torch.randint(len(data.taxa), (cfg.batch_size,), generator=g)
                x0, context, valid = data.batch(idx, g, cfg.dihedral, cfg.hflip)
                codes = drop_conditions(codes_all[idx], stage.max_level, cfg.p_uncond, cfg.p_drop, g)
                noise = torch.randn(x0.shape, generator=g)
                t = torch.randint(cfg.num_train_timesteps, (len(idx),), generator=g)
                x0, noise, t, codes = (v.to(acc.device) for v in (x0, noise, t, codes))
                a = alphas[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                if context is not None:
                    xt = torch.cat([xt, context.to(acc.device)], 1)
                xt = xt.contiguous(memory_format=torch.channels_last)
                with acc.accumulate(pmodel):
                    pred = pmodel(xt, t, codes)
                    loss = diffusion_loss(pred.float(), training_target(x0, noise, a, cfg.prediction_type),
                                          valid.to(acc.device) if valid is not None and cfg.mask_padding else None,
                                          snr[t], cfg.min_snr_gamma, cfg.prediction_type)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip:
                        acc.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    # whole model: frozen weights get grads too (kept trainable for DDP) and must
                    # not carry them into the stage that unfreezes them
                    pmodel.zero_grad(set_to_none=True)
                run_loss += loss.item()
                run_n += 1
            step += 1
            ema.update(acc.unwrap_model(pmodel), step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == bounds[stage.index + 1]:
                mean = run_loss / max(1, run_n)
                losses.append({"step": step, "stage": stage.index, "level": level_name, "loss": round(mean, 6), "lr": lr})
                bar.set_postfix(loss=f"{mean:.4f}")
                run_loss, run_n = 0.0, 0
            if step % cfg.checkpoint_every == 0 or step == bounds[stage.index + 1]:
                save_checkpoint(opt)
    bar.close()
    seconds = time.time() - t0
    acc.wait_for_everyone()
    final_loss = losses[-1]["loss"] if losses else float("nan")
    if acc.is_main_process:
        model_ = acc.unwrap_model(pmodel).cpu()
        ema.copy_to(model_)
        _save_model_folder(model_, out, cfg, data, stages, vocab, losses, seconds, noise_sched, total, final_loss)
    return TrainResult(out, total, final_loss, seconds)


def _save_model_folder(model, out, cfg, data, stages, vocab, losses, seconds, noise_sched, total, final_loss) -> None:
    """Write the EMA model + metadata; `synthgen_model.json` is written last and marks it complete."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp)
    noise_sched.save_config(tmp / "scheduler")
    for name in ["unet", "scheduler", "taxonomy_encoder.safetensors", "taxonomy_encoder.json"]:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    if cfg.taxonomy is not None:  # the tree the lineages came from: generate resolves names through it
        from taxonomy import Taxonomy

        Taxonomy.load(cfg.taxonomy).save(out / "taxonomy.json")
    elif (tax_src := data.root / "taxonomy.json").exists():
        with atomic_write(out / "taxonomy.json", "wb") as f:
            f.write(tax_src.read_bytes())
    with atomic_write(out / "train_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(cfg.model_dump_json()), f, sort_keys=False)
    counts: dict[str, dict] = {}
    for taxon, lin, label in zip(data.taxa, data.lineages, data.labels, strict=True):
        c = counts.setdefault(taxon, {"count": 0, "lineage": lin, "label": label})
        c["count"] += 1
    write_json(out / "taxon_counts.json", counts)
    if isinstance(data, WindowSet):  # sizes the in-context generator paints at
        write_json(out / "shapes.json", data.shapes)
    _write_losses(out / "losses.csv", losses)
    _plot_losses(losses, out / "loss.png", cfg.prediction_type)
    with atomic_write(out / "model_card.md", "w", encoding="utf-8") as f:
        f.write(_model_card(cfg, data, stages, vocab, losses, seconds))
    write_json(out / "synthgen_model.json", {"id": _model_hash(out), "steps": total, "final_loss": final_loss, "backend": cfg.backend})
    write_index(out, cfg.backend, generator_class(cfg.backend))

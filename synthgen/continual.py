"""Add taxa to a trained model without retraining it (FineDiffusion-style parameter-efficient tuning).

The taxonomy vocabulary and the per-level embedding tables are extended so every old taxon keeps
its indices; new rows (and, by choice, biases and norm layers) are tuned on the new taxa's chips,
and only what was tuned is stored: `delta.safetensors` + `continual.json` next to a pointer to the
base folder. `load_model_folder` rebuilds base + delta, so an extended folder is used like any
model folder. With `tune: rows` the old taxa's outputs are bit-identical to the base model's;
with biases/norms tuned, a distillation term keeps old taxa's predictions on the base model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from synthgen.config import YamlConfig
from synthgen.device import autocast, resolve_device
from synthgen.errors import SynthgenError
from synthgen.generator import generator_class, write_index
from synthgen.io_utils import atomic_write, write_json
from synthgen.models import ConditionedUNet
from synthgen.models.delta import (
    DELTA_FILE,
    MANIFEST_FILE,
    apply_delta,
    delta_state,
    extend_model,
    extend_vocab,
    is_delta_folder,
    load_model_folder,
    model_id,
    old_sizes_of,
)
from synthgen.models.prediction import training_target
from synthgen.schedulers import read_scheduler_config
from synthgen.train.data import load_chips
from synthgen.train.trainer import drop_conditions
from synthgen.training import (
    fingerprint,
    optimizer_tensors,
    restore_optimizer,
    resume_state,
    seeded_generator,
    set_lr,
    warmup_cosine,
    write_checkpoint,
)

TuneMode = Literal["rows", "rows+bias", "rows+bias+norm", "full"]


class ContinualConfig(YamlConfig):
    """How new taxa are tuned into a trained model (YAML under configs/continual/)."""

    model_config = ConfigDict(extra="forbid")
    tune: TuneMode = "rows+bias+norm"
    steps: int = 1000
    lr: float = 1e-3  # new rows start from zero and need a larger step than a full fine-tune
    warmup_steps: int = 50
    batch_size: int = 32
    grad_clip: float = 1.0
    p_drop: float = 0.3  # cut a new taxon's codes to a coarser level so new higher-rank rows learn alone
    preserve_weight: float = 1.0  # distillation towards the base model on old taxa (not needed for rows)
    replay: bool = True  # old taxa's chips in the data folder also train (ignored for rows)
    new_share: float = Field(0.5, gt=0.0, le=1.0)  # share of each replay batch drawn from the new taxa's chips
    split: str | None = "train"
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None



@dataclass
class AddTaxaResult:
    out: Path
    new_taxa: list[str]
    steps: int
    final_loss: float
    delta_bytes: int
    base_bytes: int
    seconds: float


# ---------------------------------------------------------------------------------------------
# which parameters are tuned


def tuned_names(model: ConditionedUNet, mode: TuneMode) -> list[str]:
    """Names of the whole tensors tuned besides the new rows (the tables are handled row-wise)."""
    if mode == "full":
        return [n for n, _ in model.named_parameters() if not n.startswith("encoder.tables.")]
    names: list[str] = []
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    norm_mods = {n for n, m in model.named_modules() if isinstance(m, norm_types)}
    for n, _ in model.named_parameters():
        if n.startswith("encoder.tables."):
            continue
        owner = n.rsplit(".", 1)[0]
        if "norm" in mode and owner in norm_mods:
            names.append(n)
        elif "bias" in mode and n.endswith(".bias") and owner not in norm_mods:
            names.append(n)
    return names


def _row_mask_hooks(model: ConditionedUNet, old_sizes: dict[str, int]) -> list:
    """Zero the gradient of old rows so only new rows learn (old rows are also restored each step)."""
    hooks = []
    for lv, table in zip(model.vocab.levels, model.encoder.tables, strict=True):
        n_old = old_sizes.get(lv, 0)

        def hook(grad: torch.Tensor, n_old: int = n_old) -> torch.Tensor:
            grad = grad.clone()
            grad[:n_old] = 0
            return grad

        hooks.append(table.weight.register_hook(hook))
    return hooks


# ---------------------------------------------------------------------------------------------
# add_taxa


def _new_lineages(data_lineages: list[dict], taxa: list[str], trained: dict, taxa_file: Path | None) -> dict[str, dict]:
    """taxon -> lineage of the chips' taxa the model has not seen, checked against the taxa file."""
    tax = None
    if taxa_file is not None:
        from taxonomy import Taxonomy, TaxonomyError

        try:
            tax = Taxonomy.load(taxa_file)
        except TaxonomyError as e:
            raise SynthgenError(f"{taxa_file}: {e}") from e
    out: dict[str, dict] = {}
    for taxon, lin in zip(taxa, data_lineages, strict=True):
        if taxon in trained or taxon in out:
            continue
        if tax is not None:
            try:
                t = tax.resolve(taxon)
            except Exception as e:  # noqa: BLE001 - any resolve failure is the same user error
                raise SynthgenError(f"{taxa_file}: new taxon {taxon!r} of the chips is not in this taxa file ({e})") from e
            lin = {a.level: a.name for a in tax.lineage(t)}
        out[taxon] = lin
    return out


def batch_indices(is_new: torch.Tensor, batch: int, new_share: float, g: torch.Generator) -> torch.Tensor:
    """A batch with a fixed share of new-taxon chips (the rest replayed old ones), so a new taxon
    with few chips is not swamped by the replay set; all new when nothing is replayed."""
    new_pos, old_pos = torch.nonzero(is_new).flatten(), torch.nonzero(~is_new).flatten()
    n_new = batch if len(old_pos) == 0 else max(1, round(batch * new_share))
    idx = new_pos[torch.randint(len(new_pos), (n_new,), generator=g)]
    if n_new == batch:
        return idx
    return torch.cat([idx, old_pos[torch.randint(len(old_pos), (batch - n_new,), generator=g)]])


def add_taxa(base: str | Path, data: str | Path, out: str | Path, taxa_file: str | Path | None = None,
             cfg: ContinualConfig | None = None, progress: bool = True) -> AddTaxaResult:
    """Extend model `base` with the taxa of chips folder `data` it was not trained on; write the
    delta folder `out` (resumable: checkpoints hold only the tuned tensors)."""
    cfg = cfg or ContinualConfig()
    base, data, out = Path(base).resolve(), Path(data), Path(out)
    taxa_file = Path(taxa_file) if taxa_file else None
    if taxa_file is not None and not taxa_file.exists():
        raise SynthgenError(f"{taxa_file}: taxa file not found")
    if out.resolve() == base:
        raise SynthgenError(f"{out}: the output folder must differ from the base model folder (it is never modified)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    base_model = load_model_folder(base)
    trained = json.loads((base / "taxon_counts.json").read_text(encoding="utf-8"))
    chips = load_chips(data, base_model.sample_size, cfg.split)
    new = _new_lineages(chips.lineages, chips.taxa, trained, taxa_file)
    if not new:
        raise SynthgenError(f"{data}: every taxon of these chips is already in {base}; nothing to add")
    old_sizes = old_sizes_of(base_model)
    vocab = extend_vocab(base_model.vocab, list(new.values()))
    model = extend_model(base_model, vocab)
    lineage_of = {**{t: c["lineage"] for t, c in trained.items()}, **new}
    keep = [i for i, t in enumerate(chips.taxa) if t in new or (cfg.replay and cfg.tune != "rows")]
    codes_all = torch.tensor([vocab.encode(lineage_of[chips.taxa[i]]) for i in keep], dtype=torch.long)
    is_new = torch.tensor([chips.taxa[i] in new for i in keep])
    images = chips.images[keep]
    old_codes = torch.tensor([vocab.encode(c["lineage"]) for c in trained.values()], dtype=torch.long)

    tuned = tuned_names(model, cfg.tune)
    fp = fingerprint({"base": model_id(base), "vocab": vocab.to_dict(), "n": len(keep),
                      "cfg": cfg.model_dump(exclude={"device", "threads", "log_every"})})
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    train_params = [t.weight for t in model.encoder.tables] + [params[n] for n in tuned]
    for p in train_params:
        p.requires_grad_(True)
    old_rows = [t.weight.detach()[: old_sizes.get(lv, 0)].clone()
                for lv, t in zip(vocab.levels, model.encoder.tables, strict=True)]
    hooks = _row_mask_hooks(model, old_sizes)
    teacher = None
    if cfg.tune != "rows" and cfg.preserve_weight > 0:
        teacher = extend_model(base_model, vocab).eval().to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    del base_model
    noise_sched = DDPMScheduler.from_config(read_scheduler_config(base))
    T = noise_sched.config.num_train_timesteps
    alphas = noise_sched.alphas_cumprod.to(device)
    ptype = noise_sched.config.prediction_type  # the base model's parameterisation
    model.to(device).train()
    opt = torch.optim.AdamW(train_params, lr=cfg.lr, weight_decay=0.0)

    ckdir, step, losses = out / "checkpoints", 0, []
    done_meta = out / "synthgen_model.json"
    if done_meta.exists() and (out / MANIFEST_FILE).exists():
        meta = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fp:
            print(f"already extended: {out}")
            return AddTaxaResult(out, meta["new_taxa"], meta["steps"], meta["final_loss"], meta["delta_bytes"],
                                 meta["base_bytes"], 0.0)
        raise SynthgenError(f"{out}: holds an extension made with a different model, data or settings; use another --out")
    ck = ckdir / "last"
    if (state := resume_state(ck, fp)) is not None:
        apply_delta(model, {k: v.to(device) for k, v in load_file(str(ck / DELTA_FILE)).items()}, old_sizes)
        restore_optimizer(opt, load_file(str(ck / "optimizer.safetensors")), state["optimizer"])
        step, losses = state["step"], state["losses"]
        print(f"resuming from {ck} (step {step}/{cfg.steps})")

    def checkpoint() -> None:
        tensors, meta = optimizer_tensors(opt)
        write_checkpoint(ck, {DELTA_FILE: delta_state(model, old_sizes, tuned), "optimizer.safetensors": tensors},
                         {"step": step, "fingerprint": fp, "optimizer": meta, "losses": losses})

    t0, run_loss, run_n = time.time(), 0.0, 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"add {len(new)} taxa ({cfg.tune})", unit="step")
    while step < cfg.steps:
        lr = warmup_cosine(cfg.lr, step, cfg.steps, cfg.warmup_steps)
        set_lr(opt, lr)
        g = seeded_generator(cfg.seed, step, 0, 0)
        idx = batch_indices(is_new, cfg.batch_size, cfg.new_share, g)
        x0 = images[idx].float().div(127.5).sub(1.0)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x0[flip] = x0[flip].flip(-1)
        codes = drop_conditions(codes_all[idx], len(vocab.levels) - 1, 0.0, cfg.p_drop, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(T, (len(idx),), generator=g)
        keep_codes = old_codes[torch.randint(len(old_codes), (len(idx),), generator=g)]
        x0, noise, t, codes, keep_codes = (v.to(device) for v in (x0, noise, t, codes, keep_codes))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(device):
            loss = F.mse_loss(model(xt, t, codes).float(), training_target(x0, noise, a, ptype))
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(xt, t, keep_codes).float()
                loss = loss + cfg.preserve_weight * F.mse_loss(model(xt, t, keep_codes).float(), target)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(train_params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for table, rows in zip(model.encoder.tables, old_rows, strict=True):
                table.weight[: len(rows)] = rows.to(device)
        run_loss, run_n, step = run_loss + loss.item(), run_n + 1, step + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append({"step": step, "loss": round(run_loss / run_n, 6), "lr": lr})
            bar.set_postfix(loss=f"{run_loss / run_n:.4f}")
            run_loss, run_n = 0.0, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    for h in hooks:
        h.remove()
    model.cpu()
    final_loss = losses[-1]["loss"] if losses else float("nan")
    new_counts = Counter(t for t in chips.taxa if t in new)
    _write_delta_folder(model, base, out, vocab, old_sizes, tuned, new, new_counts, trained, taxa_file, cfg, fp,
                        final_loss, losses, chips.labels, chips.taxa)
    meta = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    shutil.rmtree(ckdir, ignore_errors=True)
    return AddTaxaResult(out, sorted(new), cfg.steps, final_loss, meta["delta_bytes"], meta["base_bytes"], time.time() - t0)


def _base_bytes(base: Path) -> int:
    """Size of the full weights of a (possibly extended) base: what a full copy would store."""
    files = [base / "unet" / "diffusion_pytorch_model.safetensors", base / "taxonomy_encoder.safetensors"]
    if is_delta_folder(base):
        meta = json.loads((base / MANIFEST_FILE).read_text(encoding="utf-8"))
        return int(meta["base_bytes"])
    return sum(p.stat().st_size for p in files if p.exists())


def _write_delta_folder(model, base, out, vocab, old_sizes, tuned, new, new_counts, trained, taxa_file, cfg, fp,
                        final_loss, losses, labels, taxa) -> None:
    """Delta weights, extended vocab, merged taxon counts; `synthgen_model.json` last marks it complete."""
    out.mkdir(parents=True, exist_ok=True)
    delta = delta_state(model, old_sizes, tuned)
    tmp = out / f".{DELTA_FILE}.tmp"
    save_file(delta, str(tmp), metadata={"format": "synthgen-continual-delta", "tune": cfg.tune})
    os.replace(tmp, out / DELTA_FILE)
    write_json(out / "taxonomy_encoder.json", {**model.encoder.config(), "vocab": vocab.to_dict()})
    if (out / "scheduler").exists():
        shutil.rmtree(out / "scheduler")
    shutil.copytree(base / "scheduler", out / ".scheduler-tmp", dirs_exist_ok=True)
    os.replace(out / ".scheduler-tmp", out / "scheduler")
    label_of = dict(zip(taxa, labels, strict=True))
    counts = {**trained, **{t: {"count": new_counts[t], "lineage": new[t], "label": label_of.get(t, t)} for t in new}}
    write_json(out / "taxon_counts.json", counts)
    tax_src = taxa_file if taxa_file is not None else base / "taxonomy.json"
    if tax_src.exists():
        from taxonomy import Taxonomy

        Taxonomy.load(tax_src).save(out / "taxonomy.json")
    base_id = model_id(base)
    delta_bytes = (out / DELTA_FILE).stat().st_size
    base_bytes = _base_bytes(base)
    meta = {
        "base": str(base), "base_relative": os.path.relpath(base, out.resolve()), "base_id": base_id,
        "tune": cfg.tune, "new_taxa": sorted(new), "old_sizes": old_sizes, "tuned_tensors": tuned,
        "steps": cfg.steps, "final_loss": final_loss, "delta_bytes": delta_bytes, "base_bytes": base_bytes,
        "fingerprint": fp, "config": json.loads(cfg.model_dump_json()), "losses": losses,
    }
    write_json(out / MANIFEST_FILE, meta)
    with atomic_write(out / "model_card.md", "w", encoding="utf-8") as f:
        f.write(
            f"# synthgen model extended with {len(new)} taxa\n\n- base: `{base}` (id {base_id})\n"
            f"- tuned: {cfg.tune} ({len(tuned)} whole tensors + new embedding rows), {cfg.steps} steps\n"
            f"- delta: {delta_bytes / 1e6:.3f} MB vs {base_bytes / 1e6:.3f} MB for the full weights\n\n"
            "| new taxon | chips |\n|---|---|\n" + "".join(f"| {t} | {new_counts[t]} |\n" for t in sorted(new))
        )
    h = hashlib.sha256(base_id.encode())
    h.update((out / DELTA_FILE).read_bytes())
    write_json(out / "synthgen_model.json", {"id": h.hexdigest()[:16], "steps": cfg.steps, "final_loss": final_loss,
                                             "backend": "pixel", "base": base_id})
    write_index(out, "pixel", generator_class("pixel"))


# ---------------------------------------------------------------------------------------------
# "old taxa must not degrade": a nearest-centroid judge on real chips


class CentroidJudge:
    """Nearest taxon centroid of real chips in a small colour-layout feature space (8x8 RGB,
    standardised): cheap, training-free, enough to tell whether old taxa's samples moved."""

    def __init__(self, images: torch.Tensor, taxa: list[str], size: int = 8):
        self.size = size
        feats = self._raw(images)
        self.mean, self.std = feats.mean(0), feats.std(0) + 1e-6
        f = (feats - self.mean) / self.std
        self.taxa = sorted(set(taxa))
        lab = np.array([self.taxa.index(t) for t in taxa])
        self.centroids = np.stack([f[lab == k].mean(0) for k in range(len(self.taxa))])

    def _raw(self, images: torch.Tensor) -> np.ndarray:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return F.adaptive_avg_pool2d(x, self.size).flatten(1).numpy()

    def predict(self, images: torch.Tensor) -> list[str]:
        """images: uint8 [B,3,H,W]."""
        f = (self._raw(images) - self.mean) / self.std
        d = ((f[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return [self.taxa[k] for k in d.argmin(1)]


def sample_taxa(model: ConditionedUNet, sched_cfg: dict, lineages: dict[str, dict], n: int, steps: int = 10,
                seed: int = 0, guidance=None) -> dict[str, torch.Tensor]:
    """n images per taxon (uint8 [n,3,S,S]) with per-image seeds shared across models, so two
    models' samples of the same taxon are directly comparable."""
    from synthgen.guidance import GuidanceConfig, reference_codes
    from synthgen.pipelines import GuidedSampler

    guidance = guidance or GuidanceConfig()
    sampler = GuidedSampler(model.eval(), sched_cfg, "ddim", steps)
    s = model.sample_size
    out = {}
    for k, (taxon, lin) in enumerate(sorted(lineages.items())):
        noise = torch.randn((n, 3, s, s), generator=torch.Generator().manual_seed(seed * 1000 + k))
        codes = [model.vocab.encode(lin)] * n
        refs = [reference_codes(c, guidance.mode, guidance.reference, model.vocab.levels) for c in codes]
        out[taxon] = sampler(noise, torch.tensor(codes), torch.tensor(refs), guidance).permute(0, 3, 1, 2)
    return out


def old_taxa_report(base: str | Path, extended: str | Path, chips: str | Path, n: int = 8, steps: int = 10,
                    seed: int = 0) -> dict:
    """Judge accuracy of generated old-taxa samples before/after the extension, and how far they moved."""
    base, extended = Path(base), Path(extended)
    trained = json.loads((base / "taxon_counts.json").read_text(encoding="utf-8"))
    sched_cfg = read_scheduler_config(base)
    m0, m1 = load_model_folder(base), load_model_folder(extended)
    real = load_chips(chips, m0.sample_size, None)
    judge = CentroidJudge(real.images, real.taxa)
    lineages = {t: c["lineage"] for t, c in trained.items() if t in judge.taxa}
    before = sample_taxa(m0, sched_cfg, lineages, n, steps, seed)
    after = sample_taxa(m1, sched_cfg, lineages, n, steps, seed)
    per = {}
    for t in lineages:
        acc0 = float(np.mean([p == t for p in judge.predict(before[t])]))
        acc1 = float(np.mean([p == t for p in judge.predict(after[t])]))
        diff = (before[t].float() - after[t].float()).abs().mean().item()
        per[t] = {"acc_before": acc0, "acc_after": acc1, "mean_abs_pixel_diff": diff,
                  "identical": bool(torch.equal(before[t], after[t]))}
    return {
        "acc_before": float(np.mean([v["acc_before"] for v in per.values()])),
        "acc_after": float(np.mean([v["acc_after"] for v in per.values()])),
        "mean_abs_pixel_diff": float(np.mean([v["mean_abs_pixel_diff"] for v in per.values()])),
        "per_taxon": per,
    }

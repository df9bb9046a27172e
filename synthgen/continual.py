"""Add taxa to a trained model without retraining it (FineDiffusion-style parameter-efficient tuning).

The taxonomy vocabulary and the per-level embedding tables are extended so every old taxon keeps
its indices; new rows (and, by choice, biases and norm layers) are tuned on the new taxa's chips,
and only what was tuned is stored: `delta.safetensors` + `continual.json` next to a pointer to the
base folder. `load_model_folder` rebuilds base + delta, so an extended folder is used like any
model folder. With `tune: rows` the old taxa's outputs are bit-identical to the base model's;
with biases/norms tuned, a distillation term keeps old taxa's predictions on the base model's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
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
from synthgen.io_utils import atomic_write, write_json
from synthgen.models import ConditionedUNet, TaxonomyEncoder, TaxonVocab
from synthgen.models.prediction import training_target
from synthgen.train.data import load_chips
from synthgen.train.trainer import _gen, _opt_state_from_tensors, _opt_state_to_tensors, drop_conditions

TuneMode = Literal["rows", "rows+bias", "rows+bias+norm", "full"]
DELTA_FILE, MANIFEST_FILE = "delta.safetensors", "continual.json"


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
# loading base + delta


def is_delta_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).exists()


def _base_path(folder: Path, meta: dict) -> Path:
    """The base folder: relative to the delta folder first (both moved together), else absolute."""
    for cand in (folder / meta["base_relative"], Path(meta["base"])):
        if (cand / "synthgen_model.json").exists():
            return cand.resolve()
    raise SynthgenError(
        f"{folder / MANIFEST_FILE}: base model folder not found at {meta['base']} "
        f"(nor {meta['base_relative']} relative to {folder}); put the base folder back or retrain"
    )


def model_id(folder: str | Path) -> str:
    meta = Path(folder) / "synthgen_model.json"
    if not meta.exists():
        raise SynthgenError(f"{meta}: missing; {folder} is not a complete synthgen model folder")
    return json.loads(meta.read_text(encoding="utf-8"))["id"]


def load_model_folder(folder: str | Path) -> ConditionedUNet:
    """A model folder from `synthgen train` or an extended (delta) folder from `add_taxa`, on CPU."""
    folder = Path(folder)
    if not is_delta_folder(folder):
        return ConditionedUNet.load(folder)
    meta = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    base = _base_path(folder, meta)
    if model_id(base) != meta["base_id"]:
        raise SynthgenError(
            f"{folder / MANIFEST_FILE}: base model {base} changed since the taxa were added "
            f"(id {model_id(base)} != {meta['base_id']}); add the taxa again"
        )
    model = load_model_folder(base)  # the base may itself be an extended folder
    enc_cfg = json.loads((folder / "taxonomy_encoder.json").read_text(encoding="utf-8"))
    model = extend_model(model, TaxonVocab.from_dict(enc_cfg["vocab"]))
    apply_delta(model, load_file(str(folder / DELTA_FILE)), meta["old_sizes"])
    return model


def extend_vocab(old: TaxonVocab, lineages: list[dict[str, str]]) -> TaxonVocab:
    """Old names keep their indices; new names are appended per level; new levels slot in by order."""
    from taxonomy.spec import is_level, level_sort_key

    added = sorted({lv for lin in lineages for lv, name in lin.items() if name and lv not in old.levels})
    if all(is_level(lv) for lv in [*old.levels, *added]):  # taxonomy level names fix the order
        levels = list(old.levels)
        for lv in sorted(added, key=level_sort_key):
            pos = sum(1 for o in levels if level_sort_key(o) < level_sort_key(lv))
            levels.insert(pos, lv)
    else:  # free-form level names: order by where they appear in the lineages
        order = TaxonVocab.from_lineages([{lv: "x" for lv in old.levels}, *lineages]).levels
        levels = [lv for lv in order if lv in old.levels or lv in added]
    if [lv for lv in levels if lv in old.levels] != old.levels:
        raise SynthgenError(f"new taxa reorder the model's levels {old.levels} (got {levels}); check their lineages")
    names = {}
    for lv in levels:
        known = list(old.names.get(lv, []))
        names[lv] = known + sorted({lin[lv] for lin in lineages if lin.get(lv)} - set(known))
    return TaxonVocab(levels=levels, names=names)


def extend_model(model: ConditionedUNet, vocab: TaxonVocab) -> ConditionedUNet:
    """A copy whose encoder has `vocab`'s tables: old rows copied by level name, new rows zero
    (an untrained new taxon is conditioned like its known ancestors)."""
    old_enc, old_vocab = model.encoder, model.vocab
    enc = TaxonomyEncoder(vocab.level_sizes, old_enc.dim, old_enc.use_mlp)
    with torch.no_grad():
        for i, lv in enumerate(vocab.levels):
            enc.tables[i].weight.zero_()
            if lv in old_vocab.levels:
                j = old_vocab.levels.index(lv)
                n = old_vocab.level_sizes[j]
                if vocab.names[lv][: n - 1] != old_vocab.names[lv]:
                    raise SynthgenError(f"vocabulary of level {lv!r} does not extend the model's (old indices moved)")
                enc.tables[i].weight[:n] = old_enc.tables[j].weight
        if old_enc.mlp is not None:
            enc.mlp.load_state_dict(old_enc.mlp.state_dict())
    return ConditionedUNet(copy.deepcopy(model.unet), enc, vocab)


def old_sizes_of(base: ConditionedUNet) -> dict[str, int]:
    return dict(zip(base.vocab.levels, base.vocab.level_sizes, strict=True))


def apply_delta(model: ConditionedUNet, delta: dict[str, torch.Tensor], old_sizes: dict[str, int]) -> None:
    """Write stored new rows (`rows.<level>`) and tuned tensors (`param.<name>`) into `model`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in delta.items():
            kind, name = key.split(".", 1)
            if kind == "rows":
                table = model.encoder.tables[model.vocab.levels.index(name)].weight
                table[old_sizes.get(name, 0):] = value.to(table.dtype)
            elif kind == "param":
                params[name].copy_(value.to(params[name].dtype))
            else:
                raise SynthgenError(f"unknown delta entry {key!r}")


def delta_state(model: ConditionedUNet, old_sizes: dict[str, int], tuned: list[str]) -> dict[str, torch.Tensor]:
    """Only what changed: new rows per level (whole table for a new level) + the tuned tensors."""
    out = {}
    for lv, table in zip(model.vocab.levels, model.encoder.tables, strict=True):
        n_old = old_sizes.get(lv, 0)
        if table.weight.shape[0] > n_old:
            out[f"rows.{lv}"] = table.weight[n_old:].detach().cpu().contiguous().clone()
    params = dict(model.named_parameters())
    for name in tuned:
        out[f"param.{name}"] = params[name].detach().cpu().contiguous().clone()
    return out


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
    fp = hashlib.sha256(json.dumps({"base": model_id(base), "vocab": vocab.to_dict(), "n": len(keep),
                                    "cfg": cfg.model_dump(exclude={"device", "threads", "log_every"})},
                                   sort_keys=True, default=str).encode()).hexdigest()[:16]
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
    sched_cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    noise_sched = DDPMScheduler.from_config(sched_cfg)
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
        raise SynthgenError(f"{out}: holds an extension made with other data or settings; use another --out")
    ck = ckdir / "last"
    if (ck / "state.json").exists():
        state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        if state["fingerprint"] != fp:
            raise SynthgenError(f"{ck}: checkpoint is from other data or settings; use a new --out or delete {ckdir}")
        apply_delta(model, {k: v.to(device) for k, v in load_file(str(ck / DELTA_FILE)).items()}, old_sizes)
        opt.load_state_dict(_opt_state_from_tensors(load_file(str(ck / "optimizer.safetensors")), state["optimizer"]))
        step, losses = state["step"], state["losses"]
        print(f"resuming from {ck} (step {step}/{cfg.steps})")

    def checkpoint() -> None:
        tmp = ckdir / ".tmp-last"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(delta_state(model, old_sizes, tuned), str(tmp / DELTA_FILE))
        tensors, meta = _opt_state_to_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fp, "optimizer": meta, "losses": losses}))
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(tmp, ck)

    t0, run_loss, run_n = time.time(), 0.0, 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"add {len(new)} taxa ({cfg.tune})", unit="step")
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) * 0.9 + 0.1
        for group in opt.param_groups:
            group["lr"] = lr
        g = _gen(cfg.seed, step, 0, 0)
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
    sched_cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
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

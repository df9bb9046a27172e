"""YOLO training that is offline by construction and mixes synthetic images by a ratio, not a count.

Naively concatenating real and synthetic image lists makes the synthetic share of every batch
whatever the file counts happen to be (10x more synthetic files -> 90% synthetic batches), which
is known to hurt. `RatioDetectionTrainer` instead samples every batch with the requested share of
synthetic images, and defines an epoch as one pass over the real images, so arms with and
without synthetic data see the real data equally often.

The data.yaml contract (written by `synthgen augment-dataset` or `write_data_yaml`): besides the
usual `train`/`val`/`names`, optional `train_real` and `train_synthetic` (image list files or
folders, relative to `path`) and `synthetic_ratio` (0..1). The ratio lives in data.yaml so that it
survives ultralytics' DDP re-launch, which rebuilds the trainer from its arguments only.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("YOLO_OFFLINE", "1")  # read by ultralytics at import: no DNS/online checks
os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install missing extras at run time

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from pydantic import ConfigDict, Field, field_validator  # noqa: E402

from detection.backbones import register_backbones  # noqa: E402
from detection.dataset import read_data_yaml, save_data_yaml  # noqa: E402
from synthgen.config import YamlConfig  # noqa: E402
from synthgen.errors import ConfigError, SynthgenError  # noqa: E402
from synthgen.io_utils import dataset_inputs, refuse_inside_inputs, write_json  # noqa: E402


class DetectorTrainError(SynthgenError):
    """Training inputs (model, data.yaml, image lists) are missing or inconsistent."""


class CheckpointRefused(SynthgenError):
    """A .pt file needs more than torch/ultralytics layers to unpickle, so loading it could run code."""


# ---------------------------------------------------------------------------------------------
# checkpoints without code execution
_TRUSTED: set[str] = set()
_LAYER_MODULES = ("torch.nn.modules.", "ultralytics.nn.",
                  "timm.layers.", "timm.models._efficientnet_blocks.", "detection.backbones.")  # yolov8n-lite0.yaml
TRUST_HINT = "pass --trust-checkpoint only if you trust where this file came from"


@contextlib.contextmanager
def trusted_checkpoints(*paths: str | Path) -> Iterator[None]:
    """Within the block, these files load with full unpickling (the user's explicit opt-in)."""
    keys = {os.path.realpath(p) for p in paths} - _TRUSTED
    _TRUSTED.update(keys)
    try:
        yield
    finally:
        _TRUSTED.difference_update(keys)


def _layer_class(name: str) -> type | None:
    """The torch/ultralytics nn.Module class a checkpoint names, or None for anything else."""
    module, _, attr = name.rpartition(".")
    if not (module + ".").startswith(_LAYER_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, torch.nn.Module) else None


def _no_constructor_calls(*classes: type) -> contextlib.ExitStack:
    """While loading, calling a layer class (pickle REDUCE) fails: torch.save'd layers are rebuilt
    without their constructor, and constructors can run code (a DetectionModel evals its yaml's
    `activation`). Restored on exit."""
    stack = contextlib.ExitStack()

    def refuse(self, *a, **k):
        raise pickle.UnpicklingError(f"the file calls the {type(self).__name__} constructor while loading")

    for cls in classes:
        own = cls.__dict__.get("__init__")
        cls.__init__ = refuse
        stack.callback(lambda c=cls, o=own: setattr(c, "__init__", o) if o is not None else delattr(c, "__init__"))
    return stack


def load_torch_checkpoint(path: str | Path) -> dict:
    """`torch.load(weights_only=True)` with the torch/ultralytics layer classes the file names
    allow-listed; a file needing any other global (a crafted pickle runs code through one) is refused
    in one line naming the opt-in. Files passed to `trusted_checkpoints` load with full unpickling."""
    path = Path(path)
    if os.path.realpath(path) in _TRUSTED:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError, OSError) as e:
        raise CheckpointRefused(f"{path}: not a torch.save checkpoint archive ({type(e).__name__}); "
                                f"{TRUST_HINT}") from None
    layers = {name: _layer_class(name) for name in needed}
    other = sorted(name for name, cls in layers.items() if cls is None)
    if other:
        raise CheckpointRefused(f"{path}: refused to unpickle, it needs {', '.join(other[:4])}"
                                f"{' ...' if len(other) > 4 else ''}, not only torch/ultralytics layers "
                                f"(loading could run code); {TRUST_HINT}")
    try:
        classes = list(set(layers.values()))
        with torch.serialization.safe_globals(classes), _no_constructor_calls(*classes):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln for ln in str(e).splitlines() if "constructor" in ln or "Unsupported" in ln), "")
        raise CheckpointRefused(f"{path}: refused to unpickle ({why.strip() or type(e).__name__}); "
                                f"{TRUST_HINT}") from None


def _safe_torch_load(weight: Any, *args: Any, **kwargs: Any) -> tuple[dict, str]:
    """Stands in for ultralytics' `torch_safe_load` (which unpickles everything): same return value."""
    return load_torch_checkpoint(weight), str(weight)


# ---------------------------------------------------------------------------------------------
# offline guard
_PATCHED = False


def local_font() -> Path:
    """A TTF that ships with matplotlib: ultralytics would otherwise download Arial.ttf."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def make_ultralytics_offline() -> None:
    """Patch the few ultralytics calls that reach the network or write into input datasets.

    - fonts: `check_font` (dataset check and plotting) resolves to a local matplotlib font;
    - AMP check: downloads a reference model; on CUDA we trust bf16/fp16 autocast instead;
    - label caches: ultralytics writes `labels.cache` beside the user's labels; we never modify an
      input dataset, so the cache is not saved (labels are re-scanned, which is cheap);
    - events/hub sync are off because YOLO_OFFLINE is set before ultralytics is imported;
    - checkpoints: every .pt ultralytics loads (weights to train from, resume, export) goes through
      `load_torch_checkpoint`, so no pickle runs code unless the user trusts the file;
    - PIL.Image.open: ultralytics replaces it process-wide with a wrapper that pip-installs
      pi-heif on any unreadable image, so a corrupt user image anywhere in the process would
      become an install attempt instead of our clear error; the original is put back.
    Idempotent; called by the trainer itself so DDP worker processes are patched too."""
    global _PATCHED
    if _PATCHED:
        return
    import ultralytics.data.dataset as u_dataset
    import ultralytics.data.utils as u_data_utils
    import ultralytics.engine.trainer as u_trainer
    import ultralytics.nn.tasks as u_tasks
    import ultralytics.utils.checks as u_checks
    import ultralytics.utils.plotting as u_plotting

    def _font(font: str = "Arial.ttf") -> Path:
        return local_font()

    def _amp(model: Any) -> bool:
        return next(model.parameters()).device.type == "cuda"

    def _no_cache(prefix: str, path: Path, x: dict, version: str) -> None:
        x["version"] = version  # what ultralytics' saver sets in place; nothing is written

    u_checks.check_font = _font
    u_data_utils.check_font = _font
    u_plotting.check_font = _font
    u_trainer.check_amp = _amp
    u_dataset.save_dataset_cache_file = _no_cache
    u_tasks.torch_safe_load = _safe_torch_load
    restore_pil_open()
    register_backbones()  # model yamls may name the pretrained backbones (detection/backbones.py)
    _PATCHED = True


def restore_pil_open() -> None:
    """Undo ultralytics' process-wide PIL.Image.open patch (see `make_ultralytics_offline`)."""
    import ultralytics.utils.patches as u_patches
    from PIL import Image

    Image.open = u_patches._image_open


# ---------------------------------------------------------------------------------------------
# ratio sampler
class RatioSampler(torch.utils.data.Sampler[int]):
    """Yields indices in batch-sized blocks, each with `ratio` synthetic images (stochastically
    rounded per batch, exact on average); real and synthetic pools are each walked through
    shuffled permutations so every image is used before any repeats.

    Epoch length: real images / (1 - ratio) (every real image about once per epoch); with
    ratio 1 (synthetic only) the synthetic pool size. DDP: each of `world_size` ranks takes a
    disjoint share of each permutation and `len/world_size` samples; `set_epoch` reseeds like
    `DistributedSampler`, and each pass advances the epoch itself (ultralytics only calls
    `set_epoch` under DDP, and its loader re-iterates the sampler once per epoch)."""

    def __init__(
        self,
        is_synthetic: Sequence[bool],
        ratio: float,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
    ):
        flags = np.asarray(is_synthetic, dtype=bool)
        self.real = np.flatnonzero(~flags)
        self.synth = np.flatnonzero(flags)
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"synthetic ratio must be in [0, 1], got {ratio}")
        if ratio > 0 and len(self.synth) == 0:
            raise DetectorTrainError(f"synthetic ratio {ratio} requested but no synthetic images were found")
        if ratio < 1 and len(self.real) == 0:
            raise DetectorTrainError(f"synthetic ratio {ratio} needs real images but none were found")
        self.ratio, self.batch_size = float(ratio), int(batch_size)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        total = num_samples or (len(self.synth) if ratio >= 1 else math.ceil(len(self.real) / (1 - ratio)))
        self.num_samples = math.ceil(total / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def _stream(self, pool: np.ndarray, rng: np.random.Generator):
        """Endless shuffled walk over this rank's share of `pool` (whole pool if it is tiny)."""
        while True:
            perm = pool[rng.permutation(len(pool))]
            share = perm[self.rank :: self.world_size] if len(perm) >= self.world_size else perm
            yield from share

    def __iter__(self):
        # same permutation on every rank (shared seed), disjoint shares; batch mix differs per rank
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng_pool = np.random.default_rng([self.seed, epoch])
        rng_mix = np.random.default_rng([self.seed, epoch, self.rank, 1])
        real = self._stream(self.real, np.random.default_rng(rng_pool.integers(1 << 62))) if len(self.real) else None
        synth = (
            self._stream(self.synth, np.random.default_rng(rng_pool.integers(1 << 62))) if len(self.synth) else None
        )
        left = self.num_samples
        while left > 0:
            b = min(self.batch_size, left)
            want = self.ratio * b
            k = int(math.floor(want)) + int(rng_mix.random() < want - math.floor(want))
            batch = [int(next(synth)) for _ in range(k)] + [int(next(real)) for _ in range(b - k)]
            rng_mix.shuffle(batch)
            yield from batch
            left -= b


def _list_files(entry: str | Path, root: Path) -> list[str]:
    """Image paths of a list file or folder, resolved the way ultralytics resolves them."""
    p = Path(entry)
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        return [str(x) for x in p.rglob("*.*")]
    if not p.is_file():
        raise DetectorTrainError(f"image list {p} (from data.yaml) does not exist")
    out = []
    for line in p.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line:
            out.append(line.replace("./", str(p.parent) + os.sep, 1) if line.startswith("./") else line)
    return out


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(p))


def _trainer_class():
    from ultralytics.data.build import InfiniteDataLoader, seed_worker
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import RANK
    from ultralytics.utils.torch_utils import torch_distributed_zero_first

    class RatioDetectionTrainer(DetectionTrainer):
        """DetectionTrainer whose training loader draws batches with a fixed synthetic share."""

        def __init__(self, *args: Any, **kwargs: Any):
            make_ultralytics_offline()
            super().__init__(*args, **kwargs)

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
            ratio = self.data.get("synthetic_ratio")
            if mode != "train" or ratio is None or "train_synthetic" not in self.data:
                return super().get_dataloader(dataset_path, batch_size, rank, mode)
            root = Path(self.data.get("path") or ".")
            synth = {_norm(p) for p in _list_files(self.data["train_synthetic"], root)}
            with torch_distributed_zero_first(rank):
                dataset = self.build_dataset(dataset_path, mode, batch_size)
            flags = [_norm(f) in synth for f in dataset.im_files]
            world = int(os.environ.get("WORLD_SIZE", 1)) if rank != -1 else 1
            n_real = len(flags) - sum(flags)
            sampler = RatioSampler(
                flags, float(ratio), batch_size, seed=int(self.args.seed), rank=max(rank, 0), world_size=world,
                num_samples=n_real if self.data.get("synthetic_epoch") == "match_real" and ratio < 1 else None,
            )
            nw = min(os.cpu_count() or 1, self.args.workers)
            gen = torch.Generator()
            gen.manual_seed(int(self.args.seed) + max(RANK, 0))
            return InfiniteDataLoader(
                dataset=dataset,
                batch_size=batch_size,
                shuffle=False,
                sampler=sampler,
                num_workers=nw,
                prefetch_factor=4 if nw > 0 else None,
                pin_memory=torch.cuda.is_available(),
                collate_fn=getattr(dataset, "collate_fn", None),
                worker_init_fn=seed_worker,
                generator=gen,
            )

    return RatioDetectionTrainer


def __getattr__(name: str):
    """`RatioDetectionTrainer` is built lazily so importing this module does not import ultralytics."""
    if name == "RatioDetectionTrainer":
        return _trainer_class()
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# config + entry point
class DetectorTrainConfig(YamlConfig):
    """What `synthgen train-detector` needs; the benchmark uses one of these for every arm so all
    arms share schedule, image size and augmentation."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("yolov8n.yaml", description="ultralytics model yaml (scratch) or a local .pt")
    data: str | None = Field(None, description="data.yaml (set by the CLI or the benchmark)")
    imgsz: int = 640
    epochs: int = 100
    batch: int = 16
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | 0 | 0,1 (several GPUs: DDP)")
    workers: int = 4
    patience: int = 50
    synthetic_ratio: float | None = Field(None, ge=0.0, le=1.0)
    synthetic_epoch: Literal["extend", "match_real"] = Field(
        "extend", description="with a synthetic ratio, an epoch is real/(1-ratio) images (extend: every real image "
        "once) or as many images as real-only training sees (match_real: equal optimizer steps, for fair arms)")
    amp: bool = True  # only used on CUDA
    overrides: dict[str, Any] = Field(default_factory=dict, description="extra ultralytics train args")

    @field_validator("model")
    @classmethod
    def _model_ok(cls, v: str) -> str:
        if v.endswith(".pt") and not Path(v).is_file():
            raise ValueError(
                f"weights {v} not found; training runs offline: give a local .pt path or a model yaml "
                "such as yolov8n.yaml to train from scratch"
            )
        return v



def ultralytics_device(device: str) -> str:
    if device == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def write_data_yaml(
    path: str | Path,
    names: Sequence[str],
    train_real: str | Path,
    val: str | Path,
    train_synthetic: str | Path | None = None,
    synthetic_ratio: float | None = None,
    test: str | Path | None = None,
) -> Path:
    """Write an ultralytics data.yaml (absolute paths) in the contract above."""
    splits: dict[str, Any] = {"train": [str(train_real)] + ([str(train_synthetic)] if train_synthetic else []),
                              "val": str(val), **({"test": str(test)} if test else {})}
    mix = {"train_synthetic": str(train_synthetic), "synthetic_ratio": synthetic_ratio} if train_synthetic else {}
    return save_data_yaml(path, list(names), splits, Path(path).parent.resolve(), train_real=str(train_real), **mix)


def _prepare_data(cfg: DetectorTrainConfig, out_dir: Path) -> str:
    """Apply --synthetic-ratio to the data.yaml: writes a derived copy in out_dir, never edits the input."""
    src = Path(cfg.data or "")
    if not src.is_file():
        raise DetectorTrainError(f"data.yaml {src} not found")
    try:
        d = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DetectorTrainError(f"{src}: not valid YAML ({e})") from e
    if not isinstance(d, dict) or "names" not in d or "val" not in d:
        raise DetectorTrainError(f"{src}: needs at least 'names', 'train' and 'val'")
    root = Path(d.get("path") or ".")
    root = root if root.is_absolute() else (src.parent / root).resolve()
    ratio = cfg.synthetic_ratio if cfg.synthetic_ratio is not None else d.get("synthetic_ratio")
    if ratio is None or "train_synthetic" not in d:
        if cfg.synthetic_ratio is not None and "train_synthetic" not in d:
            raise DetectorTrainError(f"{src}: --synthetic-ratio needs a 'train_synthetic' image list in data.yaml")
    else:
        real = d.get("train_real", d.get("train"))
        d.update(train=[real, d["train_synthetic"]], train_real=real, synthetic_ratio=float(ratio),
                 synthetic_epoch=cfg.synthetic_epoch)
    splits = {k: d[k] for k in ("train", "val", "test") if k in d}
    rest = {k: v for k, v in d.items() if k not in ("path", "names", *splits)}
    return str(save_data_yaml(out_dir / "data.yaml", read_data_yaml(src).names, splits, root, **rest))


def train_detector(cfg: DetectorTrainConfig, out_dir: str | Path, verbose: bool = True,
                   trust_checkpoint: bool = False) -> Path:
    """Train (or resume, or skip if finished) a YOLO detector into `out_dir`; returns best.pt.

    `out_dir/done.json` marks a finished run; `weights/last.pt` without it resumes the run. A `.pt`
    to start from loads without running code unless `trust_checkpoint` (see `load_torch_checkpoint`)."""
    import json

    model_file = Path(cfg.model) if cfg.model.endswith(".pt") else None
    refuse_inside_inputs(out_dir, [*(dataset_inputs(cfg.data) if cfg.data else []), model_file],
                         "detector run folder")
    out_dir = Path(out_dir).resolve()
    done, started = out_dir / "done.json", out_dir / "config.json"
    best = out_dir / "weights" / "best.pt"
    wanted = cfg.model_dump(mode="json", exclude={"device", "workers"})
    if started.is_file() and json.loads(started.read_text()) != wanted:
        raise DetectorTrainError(
            f"{out_dir} holds a run with a different config ({started}); use another output folder"
        )
    if done.is_file() and best.is_file():
        return best
    make_ultralytics_offline()
    from ultralytics.utils import LOGGER

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(started, wanted)
    data = _prepare_data(cfg, out_dir)
    device = ultralytics_device(cfg.device)
    last = out_dir / "weights" / "last.pt"
    on_cuda = device != "cpu"
    args = dict(
        model=cfg.model,
        data=data,
        imgsz=cfg.imgsz,
        epochs=cfg.epochs,
        batch=cfg.batch,
        seed=cfg.seed,
        deterministic=True,
        device=device,
        workers=cfg.workers,
        patience=cfg.patience,
        project=str(out_dir.parent),
        name=out_dir.name,
        exist_ok=True,
        plots=False,
        amp=cfg.amp and on_cuda,
        verbose=verbose,
        **cfg.overrides,
    )
    if last.is_file():
        args = {"model": str(last), "resume": str(last)} | {k: args[k] for k in ("data", "device", "workers")}
    trainer_cls = _trainer_class()
    level = LOGGER.level
    if not verbose:
        LOGGER.setLevel(40)
    try:
        with trusted_checkpoints(*([model_file] if trust_checkpoint and model_file else [])):
            trainer = trainer_cls(overrides=args)
            trainer.train()
    finally:
        LOGGER.setLevel(level)
    if not best.is_file():
        raise DetectorTrainError(f"training finished without {best}")
    export_safetensors(best)
    write_json(done, {"best": str(best), "config": cfg.model_dump()})
    return best


def export_safetensors(pt: str | Path) -> Path:
    """Save a YOLO checkpoint's weights as safetensors with the model yaml and class names in
    the metadata, so it can be loaded without unpickling (see `detection.infer.load_model`)."""
    import json

    from safetensors.torch import save_file
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(pt), device="cpu")
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    out = Path(pt).with_suffix(".safetensors")
    meta = {"yaml": json.dumps(model.yaml), "names": json.dumps({int(k): v for k, v in model.names.items()})}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out

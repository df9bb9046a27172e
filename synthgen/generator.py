"""One interface for every kind of generator, and one model folder format.

A model folder holds `model_index.json` (as diffusers' does): the generator's kind, its class and
the folder format version, written last so its presence marks a complete folder. `load_generator`
reads it and hands the folder to the class registered for that kind; every command that takes
`--model` goes through it, so a new kind (pixel chips, latent Stable Diffusion, in-context painting)
plugs in by registering, not by another branch in the CLI.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from synthgen.errors import SynthgenError
from synthgen.io_utils import write_json

INDEX_FILE = "model_index.json"
FORMAT_VERSION = 1

_KINDS: dict[str, type] = {}


@runtime_checkable
class Generator(Protocol):
    """What every generator kind provides."""

    kind: ClassVar[str]

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> Self: ...

    def save_pretrained(self, folder: str | Path) -> None: ...

    def generate(self, taxon: str, n: int, out: str | Path, config: Any = None, progress: bool = True) -> Any:
        """Write `n` labelled instances of `taxon` as a pool folder at `out` (resumable)."""
        ...


def register_generator(kind: str) -> Callable[[type], type]:
    """Class decorator: `load_generator` gives folders of this kind to the class."""

    def deco(cls: type) -> type:
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return deco


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Copy the named files a folder has into another (save_pretrained of a folder's metadata)."""
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        for name in names:
            if (src / name).exists():
                shutil.copyfile(src / name, dst / name)


def write_index(folder: str | Path, kind: str, cls: type, **extra: Any) -> None:
    """Write the folder's index (last: a folder with an index is complete)."""
    write_json(Path(folder) / INDEX_FILE, {"kind": kind, "_class_name": cls.__name__, "format_version": FORMAT_VERSION, **extra})


def read_index(folder: str | Path) -> dict:
    """The folder's index; a folder without one gets one line saying what it is not."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not folder.is_dir():
        raise SynthgenError(f"{folder}: model folder not found")
    if not path.exists():
        if legacy_kind(folder) is not None:
            raise SynthgenError(f"{folder}: a model folder from before {INDEX_FILE}; upgrade it once with "
                                f"`synthgen upgrade-model {folder}`")
        raise SynthgenError(f"{folder}: not a synthgen model folder (no {INDEX_FILE}); point --model at the output of "
                            "`synthgen train`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        kind = index["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SynthgenError(f"{path}: unreadable model index ({e!r})") from e
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise SynthgenError(f"{path}: format version {index['format_version']} is newer than this synthgen "
                            f"reads ({FORMAT_VERSION}); upgrade synthgen")
    if kind not in _registered():
        raise SynthgenError(f"{path}: unknown generator kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    return index


def _registered() -> dict[str, type]:
    import synthgen.incontext.generator  # noqa: F401  (registers "incontext")
    import synthgen.latent.generator  # noqa: F401  (registers "latent")
    import synthgen.pixel  # noqa: F401  (registers "pixel")

    return _KINDS


def generator_class(kind: str) -> type:
    """The class registered for `kind` (what a trainer names in the index it writes)."""
    return _registered()[kind]


def legacy_kind(folder: str | Path) -> str | None:
    """The kind of a complete folder written before the index existed, read from the marker file each
    trainer wrote last; None when it is not one. Only `upgrade_model` and the error above use it."""
    folder = Path(folder)
    if (folder / "latent_model.json").is_file():
        return "latent"
    marker = folder / "synthgen_model.json"
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text(encoding="utf-8")).get("backend", "pixel"))
        except json.JSONDecodeError:
            return None
    return None


def upgrade_model(folder: str | Path) -> str:
    """Give a folder from before the index its `model_index.json` (weights untouched); returns its kind."""
    folder = Path(folder)
    if (folder / INDEX_FILE).exists():
        return read_index(folder)["kind"]
    kind = legacy_kind(folder)
    if kind is None:
        raise SynthgenError(f"{folder}: not a finished synthgen model folder (no synthgen_model.json or "
                            "latent_model.json); nothing to upgrade")
    if kind not in _registered():
        raise SynthgenError(f"{folder}: unknown generator kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    write_index(folder, kind, _KINDS[kind])
    return kind


def load_generator(folder: str | Path, device: str = "auto", kind: str | None = None) -> Generator:
    """The generator saved in `folder`; `kind` refuses a folder of another kind with one line."""
    index = read_index(folder)
    if kind is not None and index["kind"] != kind:
        raise SynthgenError(f"{folder}: a {index['kind']!r} model, but this needs a {kind!r} model")
    return _registered()[index["kind"]].from_pretrained(folder, device=device)


def load_train_config(path: str | Path | None, data: str | Path | None = None, **overrides: Any) -> Any:
    """The typed train config of the file's `backend` (pixel, incontext: TrainConfig; latent:
    LatentTrainConfig) with flags applied, `data` into the backend's data field (so the saved config
    records it); a flag the config would silently outvote is refused."""
    from synthgen.config import load_yaml_mapping
    from synthgen.errors import ConfigError

    backend = load_yaml_mapping(path).get("backend", "pixel") if path is not None else "pixel"
    overrides["data" if backend == "incontext" else "chips"] = str(data) if data is not None else None
    if backend == "latent":
        from synthgen.latent.config import LatentTrainConfig

        return LatentTrainConfig.from_yaml(path, **overrides)
    from synthgen.train.config import TrainConfig

    cfg = TrainConfig.from_yaml(path, **overrides)
    if overrides.get("steps_per_stage") is not None and any(s.steps is not None for s in cfg.stages):
        raise ConfigError(f"--steps-per-stage: {path} sets each stage's steps (`stages:`), which win; change them "
                          "there instead")
    return cfg


def train_generator(cfg: Any, out: str | Path, progress: bool = True) -> Any:
    """Train (or resume) the config's backend into model folder `out`; its index names the kind."""
    from synthgen.latent.config import LatentTrainConfig

    if isinstance(cfg, LatentTrainConfig):
        from synthgen.latent.train import train_latent

        return train_latent(cfg, None, out, progress=progress)
    from synthgen.train.trainer import train

    return train(cfg, out, progress=progress)

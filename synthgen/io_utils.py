"""Atomic, resumable file output: nothing half-written is ever left under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as open() makes them
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_image(image: Any, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from the final suffix, not the temp name."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), None
    )
    with atomic_write(path, "wb") as f:
        image.save(f, format=fmt, **save_kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
    """Write a whole JSONL manifest atomically (readers never see half of it)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL manifest; a torn last line (killed writer) is ignored, any other bad line is an error."""
    from synthgen.errors import SynthgenError

    path = Path(path)
    rows: list[dict] = []
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # torn final line from an interrupted append: drop it, the job redoes it
            raise SynthgenError(f"{path}:{i}: not valid JSON ({e.msg})") from e
    return rows


class JsonlAppender:
    """Append rows to a JSONL manifest, one flushed+fsynced line per row, so a kill loses at most
    the row being written (which `read_jsonl` drops). Rewrites a torn tail on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(self.path)
        if self.path.exists():
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refuse_inside_inputs(out: str | os.PathLike, inputs: Any, what: str = "output") -> None:
    """Refuse an output that is, or lies inside, one of `inputs` (files or folders; None entries are
    ignored). Links are followed, so a dataset reached through a symlink is still protected. The one
    check every writing command shares: input files and folders are never written into."""
    from synthgen.errors import SynthgenError

    o = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        i = Path(os.path.realpath(inp))
        if o == i or i in o.parents:
            raise SynthgenError(f"{out}: the {what} lies inside the input {inp}; inputs are never written to, "
                                "choose a folder outside them")


def dataset_inputs(path: str | os.PathLike, images: Any = ()) -> list[Path]:
    """What a dataset argument reads: the path itself; for a data.yaml (or a folder holding one) the
    yaml, its folder and `path:` root when a split entry is relative to them, every split entry
    (folder or image list); and the folders of `images` and of their YOLO label files."""
    from detection.dataset import label_path, read_data_yaml
    from synthgen.errors import SynthgenError

    p = Path(path)
    out = [p]
    yml = p / "data.yaml" if p.is_dir() else p
    if yml.suffix.lower() in (".yaml", ".yml") and yml.is_file():
        try:
            dy = read_data_yaml(yml)
        except SynthgenError:
            dy = None  # the dataset reader reports a broken yaml before anything is written
        if dy is not None:
            entries = [e for v in dy.splits.values() for e in v]
            if any(not Path(e).is_absolute() for e in entries):  # a root that holds data
                out += [yml.parent, dy.root]
            out += [yml] + [Path(e) if Path(e).is_absolute() else dy.root / e for e in entries]
            for split in dy.splits:
                with contextlib.suppress(SynthgenError):
                    images = [*images, *dy.image_files(split)]
    for img in {str(x) for x in images}:
        out += [Path(img).parent, label_path(Path(img)).parent]
    return list(dict.fromkeys(out))

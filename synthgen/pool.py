"""Instance pool rows: the one reader of a pool's `manifest.jsonl` (chips folders and generated pools).

Training, the judge and filter, compose and the benchmark all read pools through `read_pool`, so a
row means the same in every stage and a bad row is one error naming the manifest and its line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synthgen.errors import SynthgenError

MANIFEST = "manifest.jsonl"


class PoolRow(BaseModel):
    """One manifest row. The keys the stages rely on are typed; the keys a generator or the filter
    adds (seed, sampler, guidance, model, scores, t_start, ...) are kept as they are, so the pixel,
    latent and in-context generators' rows all validate."""

    model_config = ConfigDict(extra="allow")
    file: str = Field(min_length=1, description="chip path relative to the manifest's folder")
    label: str | None = None
    taxon: str | None = None
    lineage: dict[str, str | None] | None = None
    split: str | None = None
    source_image: str | None = None
    background: bool = False
    kept: bool | None = None


class PoolError(SynthgenError):
    """A pool folder has no manifest, or one of its rows is not a pool row."""


def read_pool(folder: str | os.PathLike, require: tuple[str, ...] = (), missing: str = "") -> list[dict]:
    """The rows of FOLDER/manifest.jsonl as dicts (see `read_pool_lines`)."""
    return [row for _, row in read_pool_lines(folder, require, missing)]


def read_pool_lines(folder: str | os.PathLike, require: tuple[str, ...] = (), missing: str = ""
                    ) -> list[tuple[int, dict]]:
    """(line number, row) of every row of FOLDER/manifest.jsonl, each validated as a `PoolRow` and holding
    every field in `require` (non-empty), so later errors can name the line too. A torn last line (a
    killed writer) is dropped; blank lines are skipped. `missing` ends the no-manifest error (what makes one)."""
    man = Path(folder) / MANIFEST
    if not man.is_file():
        raise PoolError(f"{man}: not found" + (f"; {missing}" if missing else ""))
    lines = man.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            PoolRow.model_validate(row)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # torn final line from an interrupted append: the job redoes it
            raise PoolError(f"{man}:{i}: not valid JSON ({e.msg})") from e
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "row"
            raise PoolError(f"{man}:{i}: {where}: {err['msg']}") from e
        if lacking := [k for k in require if not row.get(k)]:
            raise PoolError(f"{man}:{i}: row lacks {', '.join(lacking)}")
        rows.append((i, row))
    return rows

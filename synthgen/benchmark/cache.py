"""Stage caching: a stage's folder holds `.done.json` with the hash of its inputs and config.

A stage's hash includes its upstream stages' hashes, so changing a config value redoes that stage
and everything below it and nothing else. A folder whose hash differs (or that has no marker:
killed mid-way) is rebuilt from scratch; stages that resume internally (detector training,
generation) are given the folder back when only the marker is missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthgen.io_utils import write_json

CONFIG_SUFFIXES = (".yaml", ".yml", ".csv", ".json")


def _with_file_contents(x: Any) -> Any:
    """Config values naming a config file (a taxonomy CSV, `compose: {config: configs/compose/X.yaml}`)
    hash by name and content, not by path: editing the file redoes the stage, running from another
    checkout does not. Data files (label .txt lists) stay paths."""
    if isinstance(x, dict):
        return {k: _with_file_contents(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_with_file_contents(v) for v in x]
    if isinstance(x, str) and x.endswith(CONFIG_SUFFIXES) and Path(x).is_file():
        return {"file": Path(x).name, "sha256": hashlib.sha256(Path(x).read_bytes()).hexdigest()}
    return x


def stage_hash(*parts: Any) -> str:
    """Stable hash of JSON-able parts (pydantic models via model_dump)."""
    norm = [_with_file_contents(p.model_dump(mode="json") if hasattr(p, "model_dump") else p) for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Runs stages in `root/<name>/`, skipping those whose `.done.json` hash matches."""

    def __init__(self, root: str | Path, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time of every stage this run used (cached: when it ran)
        self.log = log

    def run(self, name: str, key: str, fn: Callable[[Path], dict | None], resumable: bool = False) -> dict:
        """Run `fn(folder)` unless cached; returns the dict stored in the marker ('result')."""
        folder = self.root / name
        marker, inputs = folder / ".done.json", folder / ".inputs.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("hash") == key:
                self.skipped.append(name)
                self.seconds[name] = float(done.get("seconds", 0.0))
                return done.get("result") or {}
            shutil.rmtree(folder)  # stale: config or upstream changed
        elif folder.exists():  # killed mid-way: resume only the same inputs, and only if the stage can
            prev = json.loads(inputs.read_text()).get("hash") if inputs.is_file() else None
            if not resumable or prev != key:
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(inputs, {"hash": key})
        if self.log:
            self.log(f"stage {name} ...")
        t0 = time.perf_counter()
        result = fn(folder) or {}
        self.seconds[name] = time.perf_counter() - t0
        write_json(marker, {"hash": key, "result": result, "seconds": self.seconds[name]})
        self.ran.append(name)
        if self.log:
            self.log(f"stage {name} done in {self.seconds[name]:.0f} s")
        return result

"""One way to read every YAML config: safe_load, errors that name the file and line, typed by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ValidationError

from synthgen.errors import ConfigError


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file, bad YAML (with its line) or a
    non-mapping is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validation_line(e: ValidationError, where: str | None = None, flags: frozenset[str] = frozenset()) -> str:
    """A pydantic error as one line, "where: field: message": a field set by a CLI flag is named as
    the flag (not blamed on the file), and further errors are counted, not dumped."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = ".".join(loc) or "value"
    if loc and loc[0] in flags:
        where, field = f"--{loc[0].replace('_', '-')}", ".".join(loc[1:])
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ": ".join(p for p in (where, field, msg) if p) + more


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Overrides onto a mapping; a nested mapping (e.g. guidance flags) updates the file's, field by field."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class YamlConfig(BaseModel):
    """Base of the typed configs under configs/: `from_yaml(path, **overrides)`, where overrides
    that are None (CLI flags not given) leave the file's value, and no path means the defaults."""

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> Self:
        data = load_yaml_mapping(path) if path is not None else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls.model_validate(_merge(data, given))
        except ValidationError as e:
            raise ConfigError(validation_line(e, str(path) if path is not None else None, frozenset(given))) from e

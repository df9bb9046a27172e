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


class YamlConfig(BaseModel):
    """Base of the typed configs under configs/: `from_yaml(path, **overrides)`, where overrides
    that are None (CLI flags not given) leave the file's value."""

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        data = load_yaml_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{path}: invalid {cls.__name__}: {e}") from e

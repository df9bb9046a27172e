"""Ranks, level names and the flat record every file format is read into.

Levels are the encoding axes of a taxonomy, coarse to fine: the seven Linnaean ranks plus
unranked clade levels. A clade level is named after the rank just above it (``clade:class`` for
Selachimorpha, below class Chondrichthyes); a second clade stacked under it is ``clade:class#2``,
one above every rank is ``clade:root``. The name therefore fixes where the level sits, so YAML,
JSON and CSV agree on level order without extra bookkeeping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
CLADE = "clade"
_CLADE_RE = re.compile(r"^clade:(root|" + "|".join(RANKS) + r")(?:#([1-9]\d*))?$")


def is_level(level: str) -> bool:
    """A rank name or a well-formed clade level name."""
    return level in RANKS or _CLADE_RE.match(level) is not None


def level_rank(level: str) -> str:
    """The rank of a level: itself for the seven ranks, ``clade`` for clade levels."""
    return CLADE if level.startswith(CLADE + ":") else level


def level_sort_key(level: str) -> tuple[int, int]:
    """Position of a level: clade levels right after the rank they are named after."""
    if level in RANKS:
        return RANKS.index(level), 0
    m = _CLADE_RE.match(level)
    if m is None:
        raise ValueError(f"not a level name: {level!r}")
    above = -1 if m.group(1) == "root" else RANKS.index(m.group(1))
    return above, int(m.group(2) or 1)


def clade_level_below(level: str | None) -> str:
    """Name of the clade level directly below `level` (None = above every rank)."""
    if level is None:
        return "clade:root"
    if level in RANKS:
        return f"clade:{level}"
    above, k = level_sort_key(level)
    return f"clade:{'root' if above < 0 else RANKS[above]}#{k + 1}"


@dataclass
class Record:
    """One taxon as read from a file, before validation; `origin` is "file:line" for errors.

    `parent` is a reference ``name`` or ``level:name`` (``rank:name`` works too), None for a root.
    `level` may be None for a clade (derived from its parent) and is the rank for ranked taxa.
    `index` is only set when reading JSON saved with a model (keeps the encoding exact).
    """

    name: str
    rank: str
    level: str | None = None
    parent: str | None = None
    common_name: str | None = None
    body_length_m: float | None = None
    label: str | None = None
    index: int | None = None
    origin: str = "<memory>"

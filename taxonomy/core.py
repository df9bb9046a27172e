"""The taxonomy tree: validation, lookup, per-level integer encoding and BioCLIP text.

Encoding: one integer per level (``Taxonomy.levels``, coarse to fine). At each level the index
is the position of the taxon's ancestor at that level among that level's names sorted
case-insensitively, starting at 1; 0 means "none". A taxon at family rank therefore encodes 0
at genus and species (and at any level its lineage skips, e.g. fish has no order). Sorted names
make the encoding independent of file order, so it survives load/save; `taxonomy.json` saved
with a model also stores each index, so adding taxa later never silently re-maps a model.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from synthgen.io_utils import atomic_write
from taxonomy import io as tio
from taxonomy.errors import AmbiguousTaxonError, TaxonNotFoundError, TaxonomyError
from taxonomy.spec import CLADE, RANKS, Record, clade_level_below, is_level, level_rank, level_sort_key

_FIELDS = ("name", "rank", "level", "parent", "common_name", "body_length_m", "label", "index")


class Taxon:
    """One node of a taxonomy, read-only (it is a dict key). Equal and hashed by (level, name);
    the tree itself lives in `Taxonomy`."""

    __slots__ = ("name", "level", "common_name", "body_length_m", "label", "index")
    name: str
    level: str
    common_name: str | None
    body_length_m: float | None
    label: str | None
    index: int

    def __init__(self, name: str, level: str, common_name: str | None = None,
                 body_length_m: float | None = None, label: str | None = None, index: int = 0):
        for k, v in zip(self.__slots__, (name, level, common_name, body_length_m, label, index), strict=True):
            object.__setattr__(self, k, v)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"Taxon is read-only (cannot set {key!r})")

    def __reduce__(self) -> tuple:
        return Taxon, tuple(getattr(self, k) for k in self.__slots__)

    @property
    def rank(self) -> str:
        """The Linnaean rank, or "clade" for an unranked clade."""
        return level_rank(self.level)

    @property
    def key(self) -> tuple[str, str]:
        return self.level, self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxon) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Taxon({self.name!r}, {self.level!r})"

    def __str__(self) -> str:
        return f"{self.rank} {self.name}"


def _fold(s: str) -> str:
    return s.strip().casefold()


def _ref_matches(rec: Record, level: str) -> bool:
    """Whether a "level:name" / "rank:name" prefix selects this record."""
    if not level:
        return True
    if level == CLADE:
        return rec.rank == CLADE
    if level.startswith(CLADE + ":"):
        return rec.rank == CLADE and (rec.level is None or rec.level == level)
    return rec.rank == level


class Taxonomy:
    """A forest of taxa (usually one kingdom root) with labels, common names and body lengths.

    Build it from records (the flat YAML form, see `taxonomy.io`) or load a file with
    `Taxonomy.load`. Every validation error names the file and line of the offending entry.
    """

    def __init__(self, records: Iterable[Record | dict[str, Any]], levels: Sequence[str] | None = None,
                 source: str | os.PathLike = "<memory>"):
        self.source = str(source)
        recs = [r if isinstance(r, Record) else self._record(r, i) for i, r in enumerate(records)]
        if not recs:
            raise TaxonomyError(f"{self.source}: empty taxonomy: no taxa")
        self._build(recs, levels)

    # ------------------------------------------------------------------ construction
    def _record(self, d: dict[str, Any], i: int) -> Record:
        if not isinstance(d, dict):
            raise TaxonomyError(f"{self.source}: taxon #{i + 1} is not a mapping: {d!r}")
        unknown = set(d) - set(_FIELDS) - {"origin"}
        if unknown:
            raise TaxonomyError(f"{self.source}: taxon #{i + 1}: unknown field(s) {sorted(unknown)}")
        return Record(**{"origin": f"{self.source}: taxon #{i + 1}", **d})

    def _check(self, r: Record) -> None:
        where = r.origin
        if not isinstance(r.name, str) or not r.name.strip():
            raise TaxonomyError(f"{where}: taxon without a name")
        r.name = " ".join(r.name.split())
        if ":" in r.name:
            raise TaxonomyError(f"{where}: taxon name {r.name!r} contains ':' (reserved for rank:name)")
        r.rank = str(r.rank).strip().lower() if r.rank is not None else ""
        if r.rank not in (*RANKS, CLADE):
            raise TaxonomyError(f"{where}: taxon {r.name!r} has unknown rank {r.rank!r} "
                                f"(expected one of {', '.join((*RANKS, CLADE))})")
        if r.level is not None:
            if not is_level(str(r.level)) or level_rank(str(r.level)) != r.rank:
                raise TaxonomyError(f"{where}: taxon {r.name!r}: level {r.level!r} does not fit rank "
                                    f"{r.rank!r} (clade levels are written clade:<rank above>)")
        elif r.rank != CLADE:
            r.level = r.rank
        if r.body_length_m is not None:
            try:
                r.body_length_m = float(r.body_length_m)
            except (TypeError, ValueError):
                raise TaxonomyError(f"{where}: taxon {r.name!r}: body_length_m {r.body_length_m!r} "
                                    "is not a number") from None
            if not (math.isfinite(r.body_length_m) and r.body_length_m > 0):
                raise TaxonomyError(f"{where}: taxon {r.name!r}: body_length_m must be a positive length "
                                    f"in metres, got {r.body_length_m!r}")
        for field in ("parent", "common_name", "label"):
            v = getattr(r, field)
            if isinstance(v, int | float) and not isinstance(v, bool) and field != "parent":
                v = str(v)  # YAML reads `label: 7` as a number
            if v is not None and not isinstance(v, str):
                raise TaxonomyError(f"{where}: taxon {r.name!r}: {field} must be text, got {v!r}")
            setattr(r, field, (" ".join(v.split()) or None) if isinstance(v, str) else None)

    @staticmethod
    def _check_duplicates(recs: list[Record]) -> None:
        seen: dict[tuple[str | None, str], Record] = {}
        for r in recs:
            k = (r.level, _fold(r.name))
            o = seen.setdefault(k, r)
            if o is r:
                continue
            pa, pb = ((x.parent or "").rpartition(":")[2] or None for x in (o, r))
            if _fold(pa or "") != _fold(pb or ""):
                raise TaxonomyError(f"{r.origin}: {r.rank} {r.name!r} has two different parents: {pb!r} here "
                                    f"and {pa!r} at {o.origin}")
            raise TaxonomyError(f"{r.origin}: {r.rank} {r.name!r} is defined twice (also at {o.origin})")

    def _build(self, recs: list[Record], levels: Sequence[str] | None) -> None:
        for r in recs:
            self._check(r)
        self._check_duplicates([r for r in recs if r.level is not None])
        by_name: dict[str, list[int]] = {}
        for i, r in enumerate(recs):
            by_name.setdefault(_fold(r.name), []).append(i)

        # parents
        parent: list[int | None] = [None] * len(recs)
        for i, r in enumerate(recs):
            if r.parent is None:
                continue
            lvl, _, nm = r.parent.rpartition(":")
            cands = [j for j in by_name.get(_fold(nm), []) if _ref_matches(recs[j], lvl)]
            if not cands:
                raise TaxonomyError(f"{r.origin}: parent {r.parent!r} of {r.name!r} is not in the taxonomy")
            if len(cands) > 1:
                opts = ", ".join(f"{recs[j].level or recs[j].rank}:{recs[j].name} ({recs[j].origin})"
                                 for j in cands)
                raise TaxonomyError(f"{r.origin}: parent {r.parent!r} of {r.name!r} is ambiguous: {opts}; "
                                    "write it as rank:name")
            parent[i] = cands[0]
            p = recs[cands[0]]
            if r.rank == "species" and " " not in r.name and p.rank == "genus":
                r.name = f"{p.name} {r.name}"  # bare epithet under its genus

        # cycles (only parent links can make one)
        state = [0] * len(recs)  # 0 new, 1 on the current path, 2 done
        for start in range(len(recs)):
            path: list[int] = []
            i: int | None = start
            while i is not None and state[i] == 0:
                state[i] = 1
                path.append(i)
                i = parent[i]
            if i is not None and state[i] == 1:
                cyc = path[path.index(i):] + [i]
                raise TaxonomyError(f"{recs[i].origin}: cycle in parent links: "
                                    + " -> ".join(f"{recs[j].name} ({recs[j].origin})" for j in cyc))
            for j in path:
                state[j] = 2

        # clade levels derived from the parent's level, ancestors first
        def level_of(i: int) -> str:
            r = recs[i]
            if r.level is None:
                p = parent[i]
                r.level = clade_level_below(None if p is None else level_of(p))
            return r.level

        for i in range(len(recs)):
            level_of(i)
        for i, r in enumerate(recs):  # a "clade:x:Name" parent reference must match the derived level
            if r.parent and r.parent.rpartition(":")[0].startswith(CLADE + ":"):
                p = recs[parent[i]]  # type: ignore[index]
                if p.level != r.parent.rpartition(":")[0]:
                    raise TaxonomyError(f"{r.origin}: parent {r.parent!r} of {r.name!r} is at level {p.level}")

        # levels
        used = {r.level for r in recs}
        if levels is None:
            levels = sorted(used, key=level_sort_key)  # type: ignore[arg-type]
        else:
            levels = [str(lv) for lv in levels]
            for lv in levels:
                if not is_level(lv):
                    raise TaxonomyError(f"{self.source}: unknown level {lv!r} in levels "
                                        f"(ranks: {', '.join(RANKS)}; clades: clade:<rank above>)")
            if len(set(levels)) != len(levels) or levels != sorted(levels, key=level_sort_key):
                raise TaxonomyError(f"{self.source}: levels must be distinct and coarse to fine, got {levels}")
            for r in recs:
                if r.level not in levels:
                    raise TaxonomyError(f"{r.origin}: taxon {r.name!r} is at level {r.level!r}, "
                                        f"which is not in levels {levels}")
        self.levels: list[str] = list(levels)
        pos = {lv: k for k, lv in enumerate(self.levels)}

        # duplicates, parent order, labels
        self._check_duplicates(recs)
        labels: dict[str, Record] = {}
        for i, r in enumerate(recs):
            p = parent[i]
            if p is not None and pos[recs[p].level] >= pos[r.level]:  # type: ignore[index]
                raise TaxonomyError(f"{r.origin}: {r.level} {r.name!r} cannot sit below "
                                    f"{recs[p].level} {recs[p].name!r} (levels go {', '.join(self.levels)})")
            if r.label is not None:
                if r.label in labels:
                    o = labels[r.label]
                    raise TaxonomyError(f"{r.origin}: dataset label {r.label!r} is mapped to two taxa: "
                                        f"{o.name!r} ({o.origin}) and {r.name!r}")
                labels[r.label] = r

        # per-level indices: sorted names, or the stored ones (JSON saved with a model)
        given = [r.index is not None for r in recs]
        if any(given) and not all(given):
            raise TaxonomyError(f"{self.source}: either every taxon has an index or none does")
        for lv in self.levels:
            members = [r for r in recs if r.level == lv]
            if all(given):
                idx = sorted(int(r.index) for r in members)  # type: ignore[arg-type]
                if idx != list(range(1, len(members) + 1)):
                    raise TaxonomyError(f"{self.source}: indices at level {lv} must be 1..{len(members)}, "
                                        f"got {idx}")
            else:
                for k, r in enumerate(sorted(members, key=lambda r: (_fold(r.name), r.name)), 1):
                    r.index = k

        # the tree
        taxa = [Taxon(r.name, r.level, r.common_name, r.body_length_m, r.label, int(r.index))  # type: ignore[arg-type]
                for r in recs]
        order = {t.key: (pos[t.level], _fold(t.name)) for t in taxa}
        self._parent: dict[Taxon, Taxon | None] = {
            t: (None if p is None else taxa[p]) for t, p in zip(taxa, parent, strict=True)}
        self._children: dict[Taxon, list[Taxon]] = {t: [] for t in taxa}
        for t, p in self._parent.items():
            if p is not None:
                self._children[p].append(t)
        for kids in self._children.values():
            kids.sort(key=lambda t: order[t.key])
        self.roots: list[Taxon] = sorted((t for t in taxa if self._parent[t] is None), key=lambda t: order[t.key])
        self._taxa: list[Taxon] = []
        stack = list(reversed(self.roots))
        while stack:
            t = stack.pop()
            self._taxa.append(t)
            stack.extend(reversed(self._children[t]))
        self._by_code = {(t.level, t.index): t for t in taxa}
        self._by_key = {(t.level, _fold(t.name)): t for t in taxa}
        self._pos = pos
        self._lookup: dict[str, list[tuple[Taxon, str]]] = {}
        for t in self._taxa:
            for how, s in (("name", t.name), ("common name", t.common_name), ("label", t.label)):
                if s:
                    self._lookup.setdefault(_fold(s), []).append((t, how))
        self.labels: dict[str, Taxon] = {t.label: t for t in self._taxa if t.label is not None}

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike) -> Taxonomy:
        """Read a .csv, .yaml/.yml or .json taxonomy (format by suffix)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            levels, records = tio.read_csv(path)
        elif suffix in (".yaml", ".yml"):
            levels, records = tio.read_yaml(path)
        elif suffix == ".json":
            levels, records = tio.parse_json(tio.read_text(path), path)
        else:
            raise TaxonomyError(f"{path}: unknown taxonomy format {path.suffix!r} (use .csv, .yaml, .yml or .json)")
        return cls(records, levels, source=path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the taxonomy atomically as .csv, .yaml/.yml or .json (format by suffix)."""
        path = Path(path)
        writers = {".csv": self.to_csv, ".yaml": self.to_yaml, ".yml": self.to_yaml, ".json": self.to_json}
        writer = writers.get(path.suffix.lower())
        if writer is None:
            raise TaxonomyError(f"{path}: unknown taxonomy format {path.suffix!r} (use .csv, .yaml, .yml or .json)")
        with atomic_write(path, "w", encoding="utf-8", newline="") as f:
            f.write(writer())
        return path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: level order and every index, so a model's encoding is reproduced exactly."""
        return tio.to_dict(self)

    def to_json(self) -> str:
        """JSON text (`taxonomy.json` saved beside models and chip folders)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any], source: str = "<json>") -> Taxonomy:
        """Inverse of `to_json` (also accepts the dict from `to_dict`)."""
        levels, records = tio.parse_json(data, source)
        return cls(records, levels, source=source)

    def to_csv(self) -> str:
        return tio.write_csv(self)

    def to_yaml(self) -> str:
        return tio.write_yaml(self)

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._taxa)

    def __iter__(self) -> Iterator[Taxon]:
        """Taxa in pre-order (roots first, children sorted by level then name)."""
        return iter(self._taxa)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, Taxon) and item in self._parent

    def __repr__(self) -> str:
        return f"Taxonomy({self.source!r}, {len(self)} taxa, levels={self.levels})"

    @property
    def level_sizes(self) -> list[int]:
        """Per level, the number of indices including the none index 0."""
        sizes = [1] * len(self.levels)
        for t in self._taxa:
            sizes[self._pos[t.level]] += 1
        return sizes

    def resolve(self, query: str | Taxon) -> Taxon:
        """Find a taxon by scientific name, common name or dataset label, case-insensitively.

        ``rank:name`` (e.g. ``genus:Megaptera``, ``clade:Selachimorpha``) picks one rank when a
        name exists at several; an ambiguous name raises `AmbiguousTaxonError` listing them.
        """
        if isinstance(query, Taxon):
            return self._node(query)
        if not isinstance(query, str) or not query.strip():
            raise TaxonNotFoundError(f"{self.source}: empty taxon name")
        prefix, _, rest = query.rpartition(":")
        prefix = prefix.strip().lower()
        if prefix and (prefix in RANKS or prefix == CLADE or prefix in self._pos):
            hits = [(t, how) for t, how in self._lookup.get(_fold(rest), [])
                    if (t.level == prefix or (prefix == CLADE and t.rank == CLADE) or t.rank == prefix)]
            name = rest.strip()
        else:
            hits, name = self._lookup.get(_fold(query), []), query.strip()
        found: dict[Taxon, list[str]] = {}
        for t, how in hits:
            found.setdefault(t, []).append(how)
        if len(found) == 1:
            return next(iter(found))
        if found:
            cands = "; ".join(f"{t.level}:{t.name} ({', '.join(how)})" for t, how in found.items())
            raise AmbiguousTaxonError(f"{self.source}: {query!r} matches {len(found)} taxa: {cands}. "
                                      "Pick one with level:name, e.g. " + next(iter(found)).level + ":" + name)
        close = difflib.get_close_matches(_fold(name), list(self._lookup), n=5, cutoff=0.6)
        hints = []
        for s in close:
            t, how = self._lookup[s][0]
            shown = {"name": t.name, "common name": t.common_name, "label": t.label}[how]
            hints.append(f"{t.name} ({t.rank})" if how == "name" else f"{shown} ({how} of {t.name})")
        raise TaxonNotFoundError(f"{self.source}: no taxon named {query!r}; "
                                 + (f"closest: {', '.join(hints)}" if hints else
                                    f"it has {len(self)} taxa, e.g. {', '.join(t.name for t in self._taxa[:5])}"))

    def _node(self, t: Taxon | str) -> Taxon:
        """The stored Taxon (callers may pass a name or an equal Taxon from another load)."""
        if isinstance(t, str):
            return self.resolve(t)
        node = self._by_key.get((t.level, _fold(t.name))) if isinstance(t, Taxon) else None
        if node is None:
            raise TaxonNotFoundError(f"{self.source}: {t!r} is not in this taxonomy")
        return node

    def parent(self, t: Taxon | str) -> Taxon | None:
        return self._parent[self._node(t)]

    def children(self, t: Taxon | str) -> list[Taxon]:
        return list(self._children[self._node(t)])

    def lineage(self, t: Taxon | str) -> list[Taxon]:
        """Root .. t inclusive."""
        t = self._node(t)
        out = [t]
        while (p := self._parent[out[-1]]) is not None:
            out.append(p)
        return out[::-1]

    def ancestors(self, t: Taxon | str) -> list[Taxon]:
        """Root .. parent (t excluded)."""
        return self.lineage(t)[:-1]

    def descendants(self, t: Taxon | str) -> list[Taxon]:
        """Every taxon below t, pre-order (t excluded)."""
        out: list[Taxon] = []
        stack = list(reversed(self._children[self._node(t)]))
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(reversed(self._children[c]))
        return out

    def leaves(self, t: Taxon | str | None = None) -> list[Taxon]:
        """Taxa without children under t (t itself if it is a leaf); the whole tree when t is None."""
        if t is None:
            return [x for x in self._taxa if not self._children[x]]
        t = self._node(t)
        return [x for x in [t, *self.descendants(t)] if not self._children[x]]

    def lca(self, a: Taxon | str, b: Taxon | str) -> Taxon | None:
        """Lowest common ancestor (a taxon is its own ancestor); None across different roots."""
        common = None
        for x, y in zip(self.lineage(a), self.lineage(b), strict=False):
            if x != y:
                break
            common = x
        return common

    def ancestor_at(self, t: Taxon | str, level: str) -> Taxon | None:
        """t's ancestor (or t) at a level or rank; None where the lineage has nothing there."""
        if level not in self._pos and level not in RANKS:
            raise TaxonomyError(f"{self.source}: unknown level {level!r} (levels: {', '.join(self.levels)})")
        return next((x for x in self.lineage(t) if x.level == level), None)

    def lineage_names(self, t: Taxon | str) -> dict[str, str]:
        """{level: name} over t's lineage (levels it skips are absent), e.g. for manifests."""
        return {x.level: x.name for x in self.lineage(t)}

    # ------------------------------------------------------------------ encoding
    def encode(self, t: Taxon | str) -> tuple[int, ...]:
        """One index per level (see module docstring); 0 = none."""
        codes = [0] * len(self.levels)
        for x in self.lineage(t):
            codes[self._pos[x.level]] = x.index
        return tuple(codes)

    def decode(self, codes: Sequence[int]) -> Taxon:
        """Inverse of `encode`; codes that are no taxon's encoding raise TaxonomyError."""
        codes = tuple(int(c) for c in codes)
        if len(codes) != len(self.levels):
            raise TaxonomyError(f"{self.source}: {len(codes)} codes for {len(self.levels)} levels {self.levels}")
        deepest = max((k for k, c in enumerate(codes) if c), default=None)
        t = None if deepest is None else self._by_code.get((self.levels[deepest], codes[deepest]))
        if t is None or self.encode(t) != codes:
            raise TaxonomyError(f"{self.source}: codes {list(codes)} are not the encoding of any taxon")
        return t

    # ------------------------------------------------------------------ text
    def _linnaean(self, t: Taxon | str) -> str:
        """BioCLIP's taxonomic string: the ranked names, genus + epithet as the binomial."""
        parts: list[str] = []
        genus = None
        for x in self.lineage(t):
            if x.rank == CLADE:
                continue
            if x.rank == "species" and genus and x.name.startswith(genus + " "):
                parts.append(x.name[len(genus) + 1:])
                continue
            if x.rank == "genus":
                genus = x.name
            parts.append(x.name)
        return " ".join(parts)

    def bioclip_text(self, t: Taxon | str, common: bool = False) -> str:
        """"a photo of Animalia Chordata ... Phoca vitulina." (BioCLIP "taxonomic" format); with
        common=True and a common name, "... Phoca vitulina with common name harbor seal."
        ("taxonomic + common"). Taxa above species stop at their own rank; clades are left out."""
        t = self._node(t)
        text = f"a photo of {self._linnaean(t)}"
        if common and t.common_name:
            text += f" with common name {t.common_name}"
        return text + "."

    def rank_text(self, t: Taxon | str) -> list[str]:
        """["kingdom: Animalia", "phylum: Chordata", ...] over the lineage (clades as "clade: X")."""
        return [f"{x.rank}: {x.name}" for x in self.lineage(t)]

"""Taxonomy files: CSV, YAML and JSON readers/writers; errors name the file and line.

CSV: one row per taxon. Columns: ``label`` (dataset label, may be empty), rank columns in
coarse-to-fine order, ``common_name`` and ``body_length_m`` (both optional). Rank columns are
the seven ranks plus unranked clade columns written ``clade`` or ``clade:<anything>``; a clade
column becomes the level ``clade:<rank column before it>`` (``clade:class#2`` for a second one
in a row). The header fixes the levels. A row's taxon is its deepest non-empty cell; inner cells
may be empty (a lineage that skips a level); label, common name and body length belong to that
deepest taxon. A species cell holds the binomial ("Phoca vitulina"); a bare epithet
("vitulina") is joined to the row's genus. Blank lines and lines starting with ``#`` are skipped.

YAML: a mapping with an optional ``levels`` list (default: the levels the taxa use, in rank
order) and ``taxa``, a list of nodes (a bare list of nodes works too). Each node has ``name``
and ``rank`` (one of the seven ranks or ``clade``), optionally ``label``, ``common_name``,
``body_length_m``, ``level`` (for a clade: which clade level, e.g. ``clade:class``; derived
from its parent when absent) and either nested ``children`` (nested form) or ``parent`` naming
its parent as ``Name`` or ``rank:Name`` (flat form); the forms may be mixed. The writer uses
the nested form with explicit levels::

    levels: [kingdom, phylum, class, order, family, genus, species]
    taxa:
      - name: Animalia
        rank: kingdom
        children:
          - {name: Chordata, rank: phylum, children: [...]}

JSON: `Taxonomy.to_json` - levels, taxa with parent references and each taxon's index, so the
encoding a model was trained with is reproduced exactly.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from taxonomy.errors import TaxonomyError
from taxonomy.spec import CLADE, RANKS, Record, clade_level_below, level_sort_key

if TYPE_CHECKING:
    from taxonomy.core import Taxonomy

ATTRS = ("label", "common_name", "body_length_m")
JSON_FORMAT = "synthgen-taxonomy"


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaxonomyError(f"{path}: taxonomy file not found") from None
    except IsADirectoryError:
        raise TaxonomyError(f"{path}: is a folder, expected a taxonomy file") from None
    except UnicodeDecodeError as e:
        raise TaxonomyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _text(value: Any) -> str | None:
    """Cell/field text with whitespace collapsed; None when empty."""
    if value is None:
        return None
    s = " ".join(str(value).split())
    return s or None


# ---- CSV ---------------------------------------------------------------------------------
def _csv_header(cells: list[str], where: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Level columns (cell index, level name) and attribute columns (name -> cell index)."""
    levels: list[tuple[int, str]] = []
    attrs: dict[str, int] = {}
    above: str | None = None
    for i, raw in enumerate(cells):
        col = raw.strip().lower()
        if not col:
            raise TaxonomyError(f"{where}: header column {i + 1} is empty")
        if col in ATTRS:
            if col in attrs:
                raise TaxonomyError(f"{where}: column {raw.strip()!r} appears twice in the header")
            attrs[col] = i
        elif col in RANKS:
            if any(lv == col for _, lv in levels):
                raise TaxonomyError(f"{where}: column {raw.strip()!r} appears twice in the header")
            above = col
            levels.append((i, col))
        elif col == CLADE or col.startswith(CLADE + ":"):
            above = clade_level_below(above)
            levels.append((i, above))
        else:
            raise TaxonomyError(
                f"{where}: unknown column {raw.strip()!r}; columns are label, the ranks "
                f"{', '.join(RANKS)}, clade (or clade:<name>) for unranked groups, common_name, body_length_m")
    if not levels:
        raise TaxonomyError(f"{where}: the header has no rank columns ({', '.join(RANKS)})")
    for (_, a), (_, b) in zip(levels, levels[1:], strict=False):
        if level_sort_key(a) >= level_sort_key(b):
            raise TaxonomyError(f"{where}: column {b!r} comes after {a!r}; rank columns go coarse to fine "
                                f"({', '.join(RANKS)})")
    return levels, attrs


def read_csv(path: Path) -> tuple[list[str], list[Record]]:
    """Levels (from the header) and one record per taxon named anywhere in the file."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text))
    header: tuple[list[tuple[int, str]], dict[str, int]] | None = None
    width = 0
    records: dict[tuple[str, str], Record] = {}
    parent_line: dict[tuple[str, str], int] = {}
    row_of: dict[tuple[str, str], int] = {}
    try:
        rows = [(reader.line_num, cells) for cells in reader]
    except csv.Error as e:
        raise TaxonomyError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    for line, cells in rows:
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        where = f"{path}:{line}"
        if header is None:
            header, width = _csv_header(cells, where), len(cells)
            continue
        level_cols, attr_cols = header
        if len(cells) > width and any(c.strip() for c in cells[width:]):
            raise TaxonomyError(f"{where}: {len(cells)} fields, the header has {width}")
        cells = [c.strip() for c in cells] + [""] * (width - len(cells))
        lineage = [(lv, " ".join(cells[i].split())) for i, lv in level_cols if cells[i]]
        if not lineage:
            raise TaxonomyError(f"{where}: the row names no taxon (every rank cell is empty)")
        genus = dict(lineage).get("genus")
        if lineage[-1][0] == "species" and " " not in lineage[-1][1]:
            if not genus:
                raise TaxonomyError(f"{where}: species {lineage[-1][1]!r} is a bare epithet and the row has "
                                    "no genus; write the binomial (e.g. 'Phoca vitulina')")
            lineage[-1] = ("species", f"{genus} {lineage[-1][1]}")
        parent: tuple[str, str] | None = None
        for lv, name in lineage:
            key = (lv, name.casefold())
            ref = None if parent is None else f"{parent[0]}:{records[parent].name}"
            rec = records.get(key)
            if rec is None:
                records[key] = Record(name=name, rank=CLADE if lv.startswith(CLADE) else lv, level=lv,
                                      parent=ref, origin=where)
                parent_line[key] = line
            elif (rec.parent or "").casefold() != (ref or "").casefold():
                def show(r: str | None) -> str:
                    return "none (a root)" if r is None else repr(r.rpartition(":")[2])
                raise TaxonomyError(f"{where}: {rec.rank} {name!r} has two different parents: {show(ref)} here "
                                    f"and {show(rec.parent)} on line {parent_line[key]}")
            parent = key
        assert parent is not None
        if parent in row_of:
            rec = records[parent]
            raise TaxonomyError(f"{where}: {rec.rank} {rec.name!r} already has a row (line {row_of[parent]}); "
                                "one row per taxon")
        row_of[parent] = line
        rec = records[parent]
        rec.origin = where
        rec.label = _text(cells[attr_cols["label"]]) if "label" in attr_cols else None
        rec.common_name = _text(cells[attr_cols["common_name"]]) if "common_name" in attr_cols else None
        if "body_length_m" in attr_cols:
            rec.body_length_m = _text(cells[attr_cols["body_length_m"]])  # type: ignore[assignment]
    if header is None:
        raise TaxonomyError(f"{path}: empty taxonomy file (no header, no rows)")
    if not records:
        raise TaxonomyError(f"{path}: empty taxonomy file (a header but no rows)")
    return [lv for _, lv in header[0]], list(records.values())


def write_csv(tax: Taxonomy) -> str:
    """One row per leaf and per taxon with a label, common name or body length (inner taxa
    without attributes are implied by their descendants' rows)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", *tax.levels, "common_name", "body_length_m"])
    pos = {lv: i for i, lv in enumerate(tax.levels)}
    for t in tax:
        if tax.children(t) and t.label is None and t.common_name is None and t.body_length_m is None:
            continue
        cells = [""] * len(tax.levels)
        for x in tax.lineage(t):
            cells[pos[x.level]] = x.name
        w.writerow([t.label or "", *cells, t.common_name or "",
                    "" if t.body_length_m is None else repr(t.body_length_m)])
    return buf.getvalue()


# ---- YAML --------------------------------------------------------------------------------
_NODE_KEYS = ("name", "rank", "level", "parent", "children", *ATTRS)


def _value_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _line(node: yaml.Node | None, default: int) -> int:
    return node.start_mark.line + 1 if node is not None else default


def _flatten(items: Any, node: yaml.Node | None, src: Path, line: int, parent: Record | None,
             out: list[Record]) -> None:
    """Nested ``children`` -> flat records whose parent is a ``rank:name`` reference."""
    if not isinstance(items, list):
        raise TaxonomyError(f"{src}:{line}: expected a list of taxa, got {type(items).__name__}")
    subnodes = node.value if isinstance(node, yaml.SequenceNode) else [None] * len(items)
    for item, sub in zip(items, subnodes, strict=False):
        at = f"{src}:{_line(sub, line)}"
        if not isinstance(item, dict):
            raise TaxonomyError(f"{at}: each taxon must be a mapping with name and rank, got {item!r}")
        unknown = sorted(str(k) for k in set(item) - set(_NODE_KEYS))
        if unknown:
            raise TaxonomyError(f"{at}: unknown key(s) {unknown}; allowed: {', '.join(_NODE_KEYS)}")
        name = _text(item.get("name"))
        if not name:
            raise TaxonomyError(f"{at}: taxon without a name")
        rank = str(item.get("rank", "")).strip().lower()
        if parent is not None and item.get("parent") is not None:
            raise TaxonomyError(f"{at}: taxon {name!r} is nested under {parent.name!r} and also names a parent")
        ref = f"{parent.rank}:{parent.name}" if parent is not None else _text(item.get("parent"))
        rec = Record(name=name, rank=rank or str(item.get("rank")), level=_text(item.get("level")), parent=ref,
                     origin=at, **{k: item.get(k) for k in ATTRS})
        out.append(rec)
        if item.get("children") is not None:
            _flatten(item["children"], _value_node(sub, "children"), src, _line(sub, line), rec, out)


def read_yaml(path: Path) -> tuple[list[str] | None, list[Record]]:
    """Levels (None = derive) and the records of a nested and/or flat YAML taxonomy."""
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # same document, kept for line numbers
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TaxonomyError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML "
                            f"({getattr(e, 'problem', None) or e})") from None
    if data is None:
        raise TaxonomyError(f"{path}: empty taxonomy file")
    taxa_node = root
    if isinstance(data, dict):
        extra = sorted(str(k) for k in set(data) - {"taxa", "levels"})
        if extra or "taxa" not in data:
            raise TaxonomyError(f"{path}:1: expected a mapping with a 'taxa' list and optional 'levels'"
                                + (f"; unknown key(s) {extra}" if extra else ""))
        taxa_node = _value_node(root, "taxa")
        levels = data.get("levels")
        if levels is not None and (not isinstance(levels, list) or not all(isinstance(x, str) for x in levels)):
            raise TaxonomyError(f"{path}:{_line(_value_node(root, 'levels'), 1)}: 'levels' must be a list of "
                                "level names")
        data = data["taxa"]
    else:
        levels = None
    records: list[Record] = []
    _flatten(data, taxa_node, path, _line(taxa_node, 1), None, records)
    if not records:
        raise TaxonomyError(f"{path}: empty taxonomy file (no taxa)")
    return levels, records


def write_yaml(tax: Taxonomy) -> str:
    """Nested YAML with explicit levels; clades carry their level so it round-trips."""

    def node(t: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"name": t.name, "rank": t.rank}
        if t.rank == CLADE:
            d["level"] = t.level
        for k in ATTRS:
            if getattr(t, k) is not None:
                d[k] = getattr(t, k)
        kids = tax.children(t)
        if kids:
            d["children"] = [node(c) for c in kids]
        return d

    data = {"levels": list(tax.levels), "taxa": [node(r) for r in tax.roots]}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# ---- JSON --------------------------------------------------------------------------------
def to_dict(tax: Taxonomy) -> dict[str, Any]:
    """Levels in order, then every taxon (pre-order) with its parent reference and index."""
    taxa = []
    for t in tax:
        p = tax.parent(t)
        d: dict[str, Any] = {"name": t.name, "rank": t.rank, "level": t.level,
                             "parent": None if p is None else f"{p.level}:{p.name}", "index": t.index}
        d.update({k: getattr(t, k) for k in ATTRS if getattr(t, k) is not None})
        taxa.append(d)
    return {"format": JSON_FORMAT, "version": 1, "levels": list(tax.levels), "taxa": taxa}


def parse_json(data: str | bytes | dict[str, Any], source: str | os.PathLike) -> tuple[list[str], list[Record]]:
    """Levels and records (with their stored indices) of `to_dict` output or its JSON text."""
    if isinstance(data, str | bytes):
        if not data.strip():
            raise TaxonomyError(f"{source}: empty taxonomy file")
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise TaxonomyError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise TaxonomyError(f"{source}: not a synthgen taxonomy JSON (expected \"format\": \"{JSON_FORMAT}\")")
    if data.get("version") != 1:
        raise TaxonomyError(f"{source}: taxonomy JSON version {data.get('version')!r} is not supported (1)")
    levels, taxa = data.get("levels"), data.get("taxa")
    if not isinstance(levels, list) or not isinstance(taxa, list):
        raise TaxonomyError(f"{source}: taxonomy JSON needs 'levels' and 'taxa' lists")
    records = []
    for i, d in enumerate(taxa):
        where = f"{source}: taxa[{i}]"
        if not isinstance(d, dict) or set(d) - {"name", "rank", "level", "parent", "index", *ATTRS}:
            raise TaxonomyError(f"{where}: not a taxon entry: {d!r}")
        if not isinstance(d.get("index"), int) or d["index"] < 1:
            raise TaxonomyError(f"{where}: index must be a positive integer, got {d.get('index')!r}")
        records.append(Record(origin=where, **d))
    return levels, records

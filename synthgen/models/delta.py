"""Pixel model folders extended with new taxa: a base folder + only what was tuned.

`delta.safetensors` (new embedding rows, tuned tensors) and `continual.json` (the base's path and id)
sit next to the extended vocabulary; `load_model_folder` rebuilds base + delta, so an extended folder
is used like any pixel model folder. Training the delta is `synthgen.continual.add_taxa`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from synthgen.errors import SynthgenError
from synthgen.models.conditioned import ConditionedUNet, TaxonomyEncoder, TaxonVocab

DELTA_FILE, MANIFEST_FILE = "delta.safetensors", "continual.json"


def is_delta_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).exists()


def _base_path(folder: Path, meta: dict) -> Path:
    """The base folder: relative to the delta folder first (both moved together), else absolute."""
    for cand in (folder / meta["base_relative"], Path(meta["base"])):
        if (cand / "synthgen_model.json").exists():
            return cand.resolve()
    raise SynthgenError(
        f"{folder / MANIFEST_FILE}: base model folder not found at {meta['base']} "
        f"(nor {meta['base_relative']} relative to {folder}); put the base folder back or retrain"
    )


def model_id(folder: str | Path) -> str:
    meta = Path(folder) / "synthgen_model.json"
    if not meta.exists():
        raise SynthgenError(f"{meta}: missing; {folder} is not a complete synthgen model folder")
    return json.loads(meta.read_text(encoding="utf-8"))["id"]


def load_model_folder(folder: str | Path) -> ConditionedUNet:
    """A model folder from `synthgen train` or an extended (delta) folder from `add_taxa`, on CPU."""
    folder = Path(folder)
    if not is_delta_folder(folder):
        return ConditionedUNet.load(folder)
    meta = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    base = _base_path(folder, meta)
    if model_id(base) != meta["base_id"]:
        raise SynthgenError(
            f"{folder / MANIFEST_FILE}: base model {base} changed since the taxa were added "
            f"(id {model_id(base)} != {meta['base_id']}); add the taxa again"
        )
    model = load_model_folder(base)  # the base may itself be an extended folder
    enc_cfg = json.loads((folder / "taxonomy_encoder.json").read_text(encoding="utf-8"))
    model = extend_model(model, TaxonVocab.from_dict(enc_cfg["vocab"]))
    apply_delta(model, load_file(str(folder / DELTA_FILE)), meta["old_sizes"])
    return model


def extend_vocab(old: TaxonVocab, lineages: list[dict[str, str]]) -> TaxonVocab:
    """Old names keep their indices; new names are appended per level; new levels slot in by order."""
    from taxonomy.spec import is_level, level_sort_key

    added = sorted({lv for lin in lineages for lv, name in lin.items() if name and lv not in old.levels})
    if all(is_level(lv) for lv in [*old.levels, *added]):  # taxonomy level names fix the order
        levels = list(old.levels)
        for lv in sorted(added, key=level_sort_key):
            pos = sum(1 for o in levels if level_sort_key(o) < level_sort_key(lv))
            levels.insert(pos, lv)
    else:  # free-form level names: order by where they appear in the lineages
        order = TaxonVocab.from_lineages([{lv: "x" for lv in old.levels}, *lineages]).levels
        levels = [lv for lv in order if lv in old.levels or lv in added]
    if [lv for lv in levels if lv in old.levels] != old.levels:
        raise SynthgenError(f"new taxa reorder the model's levels {old.levels} (got {levels}); check their lineages")
    names = {}
    for lv in levels:
        known = list(old.names.get(lv, []))
        names[lv] = known + sorted({lin[lv] for lin in lineages if lin.get(lv)} - set(known))
    return TaxonVocab(levels=levels, names=names)


def extend_model(model: ConditionedUNet, vocab: TaxonVocab) -> ConditionedUNet:
    """A copy whose encoder has `vocab`'s tables: old rows copied by level name, new rows zero
    (an untrained new taxon is conditioned like its known ancestors)."""
    old_enc, old_vocab = model.encoder, model.vocab
    enc = TaxonomyEncoder(vocab.level_sizes, old_enc.dim, old_enc.use_mlp)
    with torch.no_grad():
        for i, lv in enumerate(vocab.levels):
            enc.tables[i].weight.zero_()
            if lv in old_vocab.levels:
                j = old_vocab.levels.index(lv)
                n = old_vocab.level_sizes[j]
                if vocab.names[lv][: n - 1] != old_vocab.names[lv]:
                    raise SynthgenError(f"vocabulary of level {lv!r} does not extend the model's (old indices moved)")
                enc.tables[i].weight[:n] = old_enc.tables[j].weight
        if old_enc.mlp is not None:
            enc.mlp.load_state_dict(old_enc.mlp.state_dict())
    return ConditionedUNet(copy.deepcopy(model.unet), enc, vocab)


def old_sizes_of(base: ConditionedUNet) -> dict[str, int]:
    return dict(zip(base.vocab.levels, base.vocab.level_sizes, strict=True))


def apply_delta(model: ConditionedUNet, delta: dict[str, torch.Tensor], old_sizes: dict[str, int]) -> None:
    """Write stored new rows (`rows.<level>`) and tuned tensors (`param.<name>`) into `model`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in delta.items():
            kind, name = key.split(".", 1)
            if kind == "rows":
                table = model.encoder.tables[model.vocab.levels.index(name)].weight
                table[old_sizes.get(name, 0):] = value.to(table.dtype)
            elif kind == "param":
                params[name].copy_(value.to(params[name].dtype))
            else:
                raise SynthgenError(f"unknown delta entry {key!r}")


def delta_state(model: ConditionedUNet, old_sizes: dict[str, int], tuned: list[str]) -> dict[str, torch.Tensor]:
    """Only what changed: new rows per level (whole table for a new level) + the tuned tensors."""
    out = {}
    for lv, table in zip(model.vocab.levels, model.encoder.tables, strict=True):
        n_old = old_sizes.get(lv, 0)
        if table.weight.shape[0] > n_old:
            out[f"rows.{lv}"] = table.weight[n_old:].detach().cpu().contiguous().clone()
    params = dict(model.named_parameters())
    for name in tuned:
        out[f"param.{name}"] = params[name].detach().cpu().contiguous().clone()
    return out

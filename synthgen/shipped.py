"""Models that ship with synthgen (`models/` beside the package): what a user gets without training.

`synthgen generate --taxon X` without `--model` takes the shipped model that knows X; for a taxon no
shipped model knows, one line names the shipped models and the command that trains one.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthgen.errors import SynthgenError

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
TRAIN_HINT = ("train one on your own data: synthgen train --config configs/train/seals-incontext.yaml "
              "--data YOUR/data.yaml --out runs/my-model (set taxonomy: to your taxonomy file)")


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every complete model folder under models/."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "model_index.json").is_file()}


def trained_names(folder: Path) -> dict[str, list[str]]:
    """Taxon -> every name it answers to (label, lineage names) from the folder's taxon_counts.json."""
    counts = json.loads((folder / "taxon_counts.json").read_text(encoding="utf-8"))
    return {t: [t, c.get("label") or t, *c["lineage"].values()] for t, c in counts.items()}


def model_for(taxon: str) -> Path:
    """The shipped model that knows `taxon` (any name in a trained lineage), or one line saying what exists."""
    q = taxon.strip().lower()
    models = shipped_models()
    for folder in models.values():
        if any(q in (n.lower() for n in names) for names in trained_names(folder).values()):
            return folder
    have = "; ".join(f"{name} ({', '.join(trained_names(f))})" for name, f in models.items()) or "none"
    raise SynthgenError(f"no shipped model draws {taxon!r} (shipped: {have}); {TRAIN_HINT}")

"""The scorer interface shared by BioCLIP/CLIP and the judge, and the taxon space they score in.

A scorer answers three questions about instance chips: where do they sit in a feature space
(`embed_images`), how well do they match an intended taxon (`score`), and what does the scorer
think they are (`classify`, per taxonomy level). Filter and metrics only see this interface.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.pool import read_pool

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


class ScoringError(SynthgenError):
    """A scorer could not be built or a pool could not be scored."""


def _level_key(level: str) -> float:
    """Order levels coarse to fine: a clade level 'clade:class' sits just below its rank."""
    if level.startswith("clade:"):
        base = level.split(":", 1)[1]
        return (RANKS.index(base) + 0.5) if base in RANKS else len(RANKS)
    return RANKS.index(level) if level in RANKS else len(RANKS)


@dataclass
class TaxonSpace:
    """The dataset's taxa and their lineages, with one index per level (0 = "none" at that level).

    Built from manifest rows (`taxon` + `lineage`), so a pool, a chips folder and a judge agree
    on the encoding without needing anything beyond the manifests themselves.
    """

    lineages: dict[str, dict[str, str]]  # leaf taxon name -> {level: name}, coarse to fine
    levels: list[str] = field(default_factory=list)
    vocab: dict[str, list[str]] = field(default_factory=dict)  # level -> names (index = position + 1)

    def __post_init__(self) -> None:
        if not self.levels:
            seen: list[str] = []
            for lin in self.lineages.values():
                seen += [lv for lv in lin if lv not in seen]
            self.levels = sorted(seen, key=lambda lv: (_level_key(lv), seen.index(lv)))
        if not self.vocab:
            self.vocab = {
                lv: sorted({lin[lv] for lin in self.lineages.values() if lv in lin}) for lv in self.levels
            }

    @classmethod
    def from_rows(cls, rows: Sequence[dict], where: str = "manifest") -> TaxonSpace:
        lineages: dict[str, dict[str, str]] = {}
        for i, r in enumerate(rows, 1):
            taxon, lin = r.get("taxon"), r.get("lineage")
            if not taxon or not isinstance(lin, dict) or not lin:
                raise ScoringError(f"{where}:{i}: row needs 'taxon' and a non-empty 'lineage' dict")
            lineages.setdefault(taxon, {k: v for k, v in lin.items() if v})
        return cls(lineages)

    def to_dict(self) -> dict:
        return {"lineages": self.lineages, "levels": self.levels, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict) -> TaxonSpace:
        return cls(d["lineages"], list(d["levels"]), {k: list(v) for k, v in d["vocab"].items()})

    @property
    def taxa(self) -> list[str]:
        return sorted(self.lineages)

    @property
    def level_sizes(self) -> list[int]:
        return [len(self.vocab[lv]) + 1 for lv in self.levels]

    def lineage(self, taxon: str) -> dict[str, str]:
        try:
            return self.lineages[taxon]
        except KeyError:
            raise ScoringError(f"taxon {taxon!r} is not one of the scorer's taxa {self.taxa}") from None

    def index(self, taxon: str) -> int:
        """Position of a leaf taxon in `taxa` (the zero-shot class order)."""
        self.lineage(taxon)
        return self.taxa.index(taxon)

    def level_of(self, taxon: str) -> str:
        """The level a taxon sits at: the finest level of its lineage."""
        lin = self.lineage(taxon)
        return max(lin, key=_level_key)

    def encode(self, taxon: str) -> tuple[int, ...]:
        lin = self.lineage(taxon)
        return tuple(self.vocab[lv].index(lin[lv]) + 1 if lv in lin else 0 for lv in self.levels)

    def text(self, taxon: str) -> str:
        """BioCLIP-style prompt: 'a photo of Animalia Chordata ... Phoca vitulina.' (genus folded into species)."""
        names = list(self.lineage(taxon).values())
        if len(names) >= 2 and names[-1].startswith(names[-2] + " "):
            names = names[:-2] + [names[-1]]
        return "a photo of " + " ".join(names) + "."

    def leaf_matrix(self) -> dict[str, np.ndarray]:
        """Per level, a (n_taxa, n_names+1) 0/1 matrix mapping leaf taxa to their name at that level."""
        out = {}
        for lv in self.levels:
            m = np.zeros((len(self.taxa), len(self.vocab[lv]) + 1), dtype=np.float32)
            for i, t in enumerate(self.taxa):
                m[i, self.encode(t)[self.levels.index(lv)]] = 1.0
            out[lv] = m
        return out


@dataclass
class Pool:
    """An instance pool or chips folder: manifest rows plus the folder their `file` paths are relative to."""

    root: Path
    rows: list[dict]

    @classmethod
    def load(cls, folder: str | os.PathLike, split: str | None = None) -> Pool:
        root = Path(folder)
        rows = read_pool(root, require=("file", "label", "taxon"), missing=f"no manifest.jsonl in pool folder {root}")
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
        return cls(root, rows)

    def path(self, row: dict) -> Path:
        return self.root / row["file"]

    def images(self, rows: Sequence[dict] | None = None) -> Iterator[Image.Image]:
        for r in self.rows if rows is None else rows:
            yield load_image(self.path(r))


def split_by_source(rows: Sequence[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows for chips with no val split: whole source images go to one side (by a
    hash of `source_image`, so chips of one photo never sit on both sides and reruns agree)."""
    import hashlib

    def held(r: dict) -> bool:
        src = str(r.get("source_image") or r["file"])
        return int(hashlib.sha1(src.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    train, val = [], []
    for r in rows:
        (val if held(r) else train).append(r)
    return train, val


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB with an error naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ScoringError(f"{path}: cannot read image ({e})") from e


@contextlib.contextmanager
def preserve_torch_load_env() -> Iterator[None]:
    """Undo any process-wide TORCH_FORCE_WEIGHTS_ONLY_LOAD a model library sets while loading
    (pybioclip does), so later ultralytics checkpoint loads in the same process keep working."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Scorer(ABC):
    """One interface for every backend. Scores are per-image floats keyed by name; callers prefix
    them with the scorer name (e.g. `judge.p_taxon`)."""

    name: str = "scorer"
    ident: str = ""  # identifies the weights, so cached features from another model are never reused
    space: TaxonSpace
    batch_size: int = 64
    centroids: dict[str, np.ndarray] | None = None

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Feature vectors (n, d), float32: the space for centroids, duplicates and metrics."""

    @abstractmethod
    def level_probs(self, emb: np.ndarray) -> dict[str, np.ndarray]:
        """Per level, probabilities (n, n_names+1) over that level's names (column 0 = "none")."""

    def extra_scores(self, emb: np.ndarray, taxa: Sequence[str]) -> dict[str, np.ndarray]:
        """Backend-specific scores beside the shared ones (e.g. CLIP text similarity)."""
        return {}

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Metric feature space (the embedding)."""
        return self.embed_images(images)

    def classify(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        return self.level_probs(self.embed_images(images))

    def score(self, images: Sequence[Image.Image], taxa: Sequence[str]) -> dict[str, np.ndarray]:
        return self.score_embeddings(self.embed_images(images), taxa)

    def score_embeddings(self, emb: np.ndarray, taxa: Sequence[str]) -> dict[str, np.ndarray]:
        """All scores from precomputed embeddings, so a caller embeds each image once."""
        out = self.intended_probs(self.level_probs(emb), taxa)
        out.update(self.extra_scores(emb, taxa))
        if self.centroids:
            e = normalize(emb)
            out["centroid_cos"] = np.array(
                [float(e[i] @ self.centroids[t]) if t in self.centroids else np.nan for i, t in enumerate(taxa)],
                dtype=np.float32,
            )
        return out

    def set_reference(self, emb: np.ndarray, taxa: Sequence[str]) -> None:
        """Real instance embeddings per taxon; enables the centroid-cosine score."""
        e, taxa = normalize(emb), np.asarray(taxa)
        self.centroids = {t: normalize(e[taxa == t].mean(0, keepdims=True))[0] for t in sorted(set(taxa.tolist()))}

    def intended_probs(self, probs: dict[str, np.ndarray], taxa: Sequence[str]) -> dict[str, np.ndarray]:
        """`p_<level>` along the intended lineage, and `p_taxon` = their minimum: the intended taxon is
        no more likely than any of its ancestors. For zero-shot leaf sums this is the probability at the
        taxon's own level; for per-level heads it stops a single-name level (always 1) from passing a
        chip whose phylum is wrong."""
        n = len(taxa)
        per_level = {lv: np.full(n, np.nan, dtype=np.float32) for lv in self.space.levels}
        for i, t in enumerate(taxa):
            for lv, c in zip(self.space.levels, self.space.encode(t), strict=True):
                if c:
                    per_level[lv][i] = probs[lv][i, c]
        p_taxon = np.nanmin(np.stack(list(per_level.values()), 1), axis=1) if n else np.zeros(0, np.float32)
        return {"p_taxon": p_taxon.astype(np.float32)} | {f"p_{lv}": v for lv, v in per_level.items()}

    def taxon_correct(self, probs: dict[str, np.ndarray], taxa: Sequence[str]) -> np.ndarray:
        """Per chip, whether the prediction matches the intended lineage at every level it names."""
        pred = self.predict(probs)
        return np.array([all(pred[lv][i] == name for lv, name in self.space.lineage(t).items())
                         for i, t in enumerate(taxa)], dtype=bool)

    def predict(self, probs: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """Per level, the most probable name (the "none" column excluded)."""
        return {lv: [self.space.vocab[lv][j] for j in probs[lv][:, 1:].argmax(1)] for lv in self.space.levels}


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def batched(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def to_tensor_batch(images: Sequence[Image.Image], size: int, mean, std) -> torch.Tensor:
    """Resize (square, bicubic) and normalise a list of PIL images into one float batch."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s

"""Scorers for instance chips: BioCLIP / CLIP (open_clip) and the judge trained on the user's real chips."""

from __future__ import annotations

from synthgen.scoring.base import Pool, Scorer, ScoringError, TaxonSpace, load_image, preserve_torch_load_env
from synthgen.scoring.judge import JudgeConfig, JudgeScorer, train_judge
from synthgen.scoring.openclip import BIOCLIP, BIOCLIP2, OpenClipScorer, load_open_clip

__all__ = [
    "BIOCLIP", "BIOCLIP2", "JudgeConfig", "JudgeScorer", "OpenClipScorer", "Pool", "Scorer", "ScoringError",
    "TaxonSpace", "load_image", "load_open_clip", "load_scorer", "preserve_torch_load_env", "train_judge",
]


def load_scorer(spec: str, space: TaxonSpace | None = None, device: str = "auto", batch_size: int = 64) -> Scorer:
    """Build a scorer from a CLI spec: `judge:DIR`, `bioclip`, `bioclip:PATH|hf-hub:ID`,
    `clip:NAME[:TAG|PATH]`. open_clip scorers need the dataset's taxon `space` (judges carry their own)."""
    kind, _, rest = spec.partition(":")
    if kind == "judge":
        if not rest:
            raise ScoringError("judge scorer needs a folder: --scorer judge:/path/to/judge")
        return JudgeScorer(rest, device=device, batch_size=batch_size)
    if kind not in ("bioclip", "clip"):
        raise ScoringError(f"unknown scorer {spec!r}: use judge:DIR, bioclip[:PATH] or clip:NAME[:TAG|PATH]")
    if space is None:
        raise ScoringError(f"scorer {spec!r} needs the dataset's taxa (a pool or chips manifest with lineages)")
    if kind == "bioclip":
        return OpenClipScorer(space, model=rest or BIOCLIP2, device=device, batch_size=batch_size, name="bioclip")
    name, _, tag = rest.partition(":")
    if not name:
        raise ScoringError("clip scorer needs a model name: --scorer clip:ViT-B-32:openai")
    return OpenClipScorer(space, model=name, pretrained=tag or None, device=device, batch_size=batch_size,
                          name="clip")

"""LatentGenerator: the "latent" kind of `synthgen.generator` (Stable Diffusion + LoRA, animals cut out).

A folder holds only what training added (LoRA, per-rank modules, metadata); the base Stable
Diffusion weights live elsewhere and load on the first `generate`, so bad arguments are refused
before the seconds that loading takes.
"""

from __future__ import annotations

from pathlib import Path

from synthgen.generator import copy_files, read_index, register_generator, write_index
from synthgen.latent.config import LatentGenerateConfig
from synthgen.latent.generate import LatentGenerateResult, generate_latent
from synthgen.latent.loading import SDComponents
from synthgen.latent.train import COND_FILE, LORA_FILE, MODEL_FILE

FILES = (LORA_FILE, COND_FILE, MODEL_FILE, "taxon_counts.json", "taxonomy.json", "train_config.yaml", "model_card.md")


@register_generator("latent")
class LatentGenerator:
    """Full frames from a LoRA-tuned Stable Diffusion, each animal then cut out; classifier-free
    guidance (w = 7.5) by default."""

    config_class = LatentGenerateConfig

    def __init__(self, folder: str | Path, device: str = "auto", sd: SDComponents | None = None):
        self.folder, self.device, self.sd = Path(folder), device, sd

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> LatentGenerator:
        read_index(folder)
        return cls(folder, device)

    def save_pretrained(self, folder: str | Path) -> None:
        """The trained files as they are (the base model stays referenced, not copied), index last."""
        copy_files(self.folder, Path(folder), FILES)
        write_index(folder, self.kind, type(self))

    def generate(self, taxon: str, n: int, out: str | Path, config: LatentGenerateConfig | None = None,
                 progress: bool = True) -> LatentGenerateResult:
        """A resumable pool of `n` cut-out instances of `taxon` at `out`."""
        return generate_latent(self.folder, taxon, n, out, config or LatentGenerateConfig(device=self.device),
                               sd=self.sd, progress=progress)

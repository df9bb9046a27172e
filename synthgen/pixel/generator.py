"""PixelGenerator: the "pixel" kind of `synthgen.generator` (whole chips from a conditioned UNet).

A handle on a model folder of `synthgen train` (or one extended by `train --add-taxa`); the
weights load on first use, so a command refuses bad arguments before it spends time loading them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synthgen.generator import copy_files, read_index, register_generator, write_index
from synthgen.pipelines.generate import GenerateConfig, GenerateResult, generate
from synthgen.pipelines.sampling import load_model

# metadata a folder carries besides its weights (copied as they are by save_pretrained)
METADATA = ("taxon_counts.json", "taxonomy.json", "train_config.yaml", "branch_points.json", "model_card.md",
            "synthgen_model.json")


@register_generator("pixel")
class PixelGenerator:
    """Taxonomy-conditioned chips drawn whole in pixel space; guidance taxonomic (parent, w = 2) by default."""

    config_class = GenerateConfig

    def __init__(self, folder: str | Path, device: str = "auto"):
        self.folder, self.device = Path(folder), device
        self._loaded: tuple | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> PixelGenerator:
        read_index(folder)
        return cls(folder, device)

    def load(self, device: torch.device | None = None) -> tuple:
        """(ConditionedUNet in eval mode, scheduler config), loaded once."""
        if self._loaded is None:
            from synthgen.device import resolve_device

            self._loaded = load_model(self.folder, device or resolve_device(self.device))
        return self._loaded

    def save_pretrained(self, folder: str | Path) -> None:
        """A full folder (an extended model's base + delta merged into plain weights), index last."""
        from diffusers import DDPMScheduler

        folder = Path(folder)
        model, sched = self.load()
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder)
        DDPMScheduler.from_config(sched).save_config(folder / "scheduler")
        copy_files(self.folder, folder, METADATA)
        write_index(folder, self.kind, type(self))

    def generate(self, taxon: str, n: int, out: str | Path, config: GenerateConfig | None = None,
                 progress: bool = True) -> GenerateResult:
        """A resumable pool of `n` chips of `taxon` (any rank) at `out`."""
        return generate(self.folder, taxon, n, out, config or GenerateConfig(device=self.device), progress)

"""UNet presets, the taxonomy encoder and the wrapper that feeds its vector into the UNet.

The encoder's output has the size of the UNet's time embedding and is added to it through
`class_embed_type="identity"`, so a taxon conditions every ResNet block the way the timestep does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from synthgen.config import load_yaml_mapping
from synthgen.errors import SynthgenError

# Size presets. tiny: tests (a CPU step in well under a second at 32 px); small: CPU runs of hours
# at 48-64 px; base/large: GPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        # the mid block's attention runs at half the image size; diffusers' default head size 8 made
        # it ~30% of a 64 px forward (tiny as slow as small); saved models keep the head size they had
        attention_head_dim=32,
    ),
    "small": dict(
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    "base": dict(
        block_out_channels=(128, 256, 256, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=64,
    ),
    "large": dict(
        block_out_channels=(192, 384, 576, 768),
        layers_per_block=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=64,
    ),
}


def preset_kwargs(preset: str) -> dict:
    """UNet2DModel arguments of a named preset or of a YAML file (configs/model/*.yaml)."""
    if preset in PRESETS:
        return dict(PRESETS[preset])
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml_mapping(path)
        if data.get("preset") in PRESETS:
            data = {**PRESETS[data.pop("preset")], **data}
        unknown = set(data) - set(PRESETS["large"]) - {"dropout", "resnet_time_scale_shift", "act_fn", "downsample_type", "upsample_type"}
        if unknown:
            raise SynthgenError(f"{path}: unknown UNet fields {sorted(unknown)}")
        return data
    raise SynthgenError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)} or a configs/model/*.yaml file")


def build_unet(preset: str, sample_size: int, context_channels: int = 0, **overrides) -> UNet2DModel:
    """A fresh RGB UNet2DModel from a preset whose class embedding is the taxonomy vector itself;
    `context_channels` more inputs (as diffusers' inpainting UNets take the masked image and mask)."""
    kw = {**preset_kwargs(preset), **overrides}
    factor = 2 ** (len(kw["block_out_channels"]) - 1)
    if sample_size % factor:
        raise SynthgenError(f"image size {sample_size} must be divisible by {factor} for preset {preset!r}")
    return UNet2DModel(
        sample_size=sample_size, in_channels=3 + context_channels, out_channels=3, class_embed_type="identity", **kw
    )


@dataclass
class TaxonVocab:
    """Per-level name lists: index 0 of every level is "none", name i is index i (1-based)."""

    levels: list[str]
    names: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_lineages(cls, lineages: list[dict[str, str]]) -> TaxonVocab:
        """Levels ordered coarse to fine as they appear in the lineages, names sorted for stability."""
        pos: dict[str, list[int]] = {}
        for lin in lineages:
            for i, lvl in enumerate(lin):
                pos.setdefault(lvl, []).append(i)
        levels = sorted(pos, key=lambda lv: (sum(pos[lv]) / len(pos[lv]), lv))
        names = {lv: sorted({lin[lv] for lin in lineages if lin.get(lv)}) for lv in levels}
        return cls(levels=levels, names=names)

    @property
    def level_sizes(self) -> list[int]:
        return [len(self.names[lv]) + 1 for lv in self.levels]

    def encode(self, lineage: dict[str, str]) -> tuple[int, ...]:
        """Codes for a lineage; levels the lineage lacks (or the vocab never saw) are none."""
        out = []
        for lv in self.levels:
            name = lineage.get(lv)
            out.append(self.names[lv].index(name) + 1 if name in self.names[lv] else 0)
        return tuple(out)

    def decode(self, codes: tuple[int, ...]) -> dict[str, str]:
        return {lv: self.names[lv][c - 1] for lv, c in zip(self.levels, codes, strict=True) if c}

    def to_dict(self) -> dict:
        return {"levels": self.levels, "names": self.names}

    @classmethod
    def from_dict(cls, d: dict) -> TaxonVocab:
        return cls(levels=list(d["levels"]), names={k: list(v) for k, v in d["names"].items()})


class TaxonomyEncoder(nn.Module):
    """One embedding table per level (row 0 = learned "none"), summed, then an optional MLP."""

    def __init__(self, level_sizes: list[int], dim: int, mlp: bool = True):
        super().__init__()
        self.level_sizes, self.dim, self.use_mlp = list(level_sizes), dim, mlp
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in level_sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)
            nn.init.zeros_(t.weight[0:1])  # an untrained "none" adds nothing
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if mlp else None

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [B, levels] -> [B, dim]."""
        v = sum(t(codes[:, i]) for i, t in enumerate(self.tables))
        return v + self.mlp(v) if self.mlp is not None else v  # residual MLP: starts near the plain sum

    def config(self) -> dict:
        return {"level_sizes": self.level_sizes, "dim": self.dim, "mlp": self.use_mlp}


class ConditionedUNet(nn.Module):
    """eps(x_t, t, taxon codes): the UNet with the encoder's vector added to its time embedding."""

    def __init__(self, unet: UNet2DModel, encoder: TaxonomyEncoder, vocab: TaxonVocab):
        super().__init__()
        self.unet, self.encoder, self.vocab = unet, encoder, vocab

    @classmethod
    def create(cls, preset: str, sample_size: int, vocab: TaxonVocab, mlp: bool = True,
               context_channels: int = 0) -> ConditionedUNet:
        unet = build_unet(preset, sample_size, context_channels)
        dim = unet.config.block_out_channels[0] * 4  # UNet2DModel's time embedding size
        return cls(unet, TaxonomyEncoder(vocab.level_sizes, dim, mlp), vocab)

    def forward(self, x: torch.Tensor, t: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.encoder(codes)).sample

    @property
    def context_channels(self) -> int:
        """Inputs beyond the noisy image (in-context models: masked window + hole)."""
        return int(self.unet.config.in_channels) - 3

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    def save(self, folder: Path) -> None:
        """diffusers layout: `unet/` (safetensors) + `taxonomy_encoder.safetensors` + its config json."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(folder / "taxonomy_encoder.safetensors"))
        cfg = {**self.encoder.config(), "vocab": self.vocab.to_dict()}
        (folder / "taxonomy_encoder.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> ConditionedUNet:
        """A full pixel folder's weights; extended (delta) folders load through `models.delta.load_model_folder`."""
        folder = Path(folder)
        need = [folder / "unet" / "config.json", folder / "taxonomy_encoder.safetensors", folder / "taxonomy_encoder.json"]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise SynthgenError(
                f"{folder} is not a trained synthgen model folder (missing {', '.join(missing)}); "
                "point --model at the output folder of `synthgen train`"
            )
        unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
        cfg = json.loads((folder / "taxonomy_encoder.json").read_text(encoding="utf-8"))
        enc = TaxonomyEncoder(cfg["level_sizes"], cfg["dim"], cfg["mlp"])
        enc.load_state_dict(load_file(str(folder / "taxonomy_encoder.safetensors")))
        return cls(unet, enc, TaxonVocab.from_dict(cfg["vocab"]))

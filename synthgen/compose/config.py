"""Typed compositor config: every knob has a default that works for a nadir drone dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from synthgen.config import YamlConfig


class _Strict(YamlConfig):
    model_config = ConfigDict(extra="forbid")


class MaskConfig(_Strict):
    """Foreground estimation: GrabCut seeded with the chip's central box, colour fallback. Chips are
    cut with the animal's box centred and its longer side spanning the central box, so a mask is
    confined to that box (plus `box_pad`) and must agree with it."""

    margin: float = Field(0.15, ge=0.0, le=1.0, description="chip margin around the box (chips use 0.15)")
    grabcut_iters: int = Field(4, ge=1)
    max_side: int = Field(160, ge=16, description="chips are downscaled to this for GrabCut (speed)")
    denoise: Literal[0, 3, 5] = Field(3, description="median filter size before GrabCut (drone tiles carry salt-and-"
                         "pepper speckle that splits the colour models); 0: off")
    fg_core: float = Field(0.15, gt=0.0, le=0.5, description="semi-axes of the sure-foreground disc at the chip "
                           "centre, as a fraction of the central box (0.08 left seal bodies unclaimed)")
    box_pad: int = Field(2, ge=0, description="px beyond the central box a mask may reach (rounding, resize); "
                         "outside it is sure background")
    min_area: float = Field(0.12, description="min mask area as a fraction of the central box")
    max_area: float = Field(1.25, description="max mask area as a fraction of the central box")
    edge_contact: float = Field(0.3, ge=0.0, le=1.0, description="a mask presses against a side of the padded "
                                "central box when more than this fraction of its extent lies on that side")
    max_edges_touched: int = Field(0, ge=0, le=4, description="0: a mask pressing against any side of the padded "
                                   "central box is a cut-off animal or leaked background (rejected); 3: only "
                                   "reject masks pressing against all four")
    max_second_blob: float = Field(0.35, description="reject if 2nd component >= this x largest")
    min_box_iou: float = Field(0.5, ge=0.0, le=1.0, description="min IoU of the mask's tight box with the box "
                               "the chip implies (centred, longer side spanning the central box)")


class ScaleConfig(_Strict):
    """Instance size: sampled from the dataset's per-taxon box sizes, or physical (GeoTIFF)."""

    mode: Literal["dataset", "physical"] = "dataset"
    jitter: float = Field(0.15, ge=0.0, description="log-normal sigma on the sampled size (kernel)")
    body_length_m: dict[str, float] = Field(default_factory=dict, description="label -> metres override")
    size_px: dict[str, float] = Field(default_factory=dict, description="label -> sqrt(box area) in px, for "
                                      "labels without real boxes (e.g. bare background tiles)")
    taxonomy: str | None = Field(None, description="taxonomy file giving body_length_m per taxon")


class CountConfig(_Strict):
    distribution: Literal["poisson", "uniform"] = "poisson"
    mean: float = Field(3.0, ge=0.0, description="poisson mean")
    low: int = Field(1, ge=0)
    high: int = Field(5, ge=0)
    max: int = Field(20, ge=0)


class HabitatConfig(_Strict):
    """Where instances may go: anywhere, a colour rule, a raster mask, or polygons."""

    kind: Literal["none", "color", "raster", "vector"] = "none"
    l_min: float = Field(0.0, description="color: min Lab lightness 0..100")
    l_max: float = Field(100.0)
    chroma_max: float = Field(200.0, description="color: max Lab chroma")
    path: str | None = Field(None, description="raster: GeoTIFF or folder of <stem>.png masks; vector: file")
    min_fraction: float = Field(0.85, ge=0.0, le=1.0, description="share of the instance inside habitat")


class BlendConfig(_Strict):
    mix: dict[Literal["hard", "feather", "gaussian", "poisson"], float] = Field(
        default_factory=lambda: {"hard": 0.2, "feather": 0.4, "gaussian": 0.35, "poisson": 0.05})
    feather_px: float = Field(3.0, ge=0.0)
    poisson_max_shift: float = Field(30.0, ge=0.0, description="mean |RGB change| above which a Poisson "
                                     "paste falls back to feathering (the clone washed the animal out)")
    gaussian_sigma: float = Field(1.2, ge=0.0)
    color_match: float = Field(0.35, ge=0.0, le=1.0, description="0 = none, 1 = full Lab mean/std match")
    shadow_p: float = Field(0.0, ge=0.0, le=1.0)
    shadow_opacity: float = Field(0.35, ge=0.0, le=1.0)
    shadow_offset: float = Field(0.12, description="shadow offset as a fraction of instance size")


class TileAugConfig(_Strict):
    """Whole-tile photometric + noise augmentation (albumentations), applied after pasting."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = 0.1
    contrast: float = 0.1
    noise_p: float = Field(0.3, ge=0.0, le=1.0)
    jpeg_quality: int | None = Field(None, ge=1, le=100, description="None: the source's estimated quality")


class ComposeConfig(_Strict):
    """augment-dataset settings (YAML files under configs/compose/)."""

    view: Literal["nadir", "ground"] = "nadir"
    max_rotation_deg: float = Field(180.0, ge=0.0, le=180.0, description="nadir rotation range (+-)")
    copies_per_tile: int = Field(1, ge=1, description="synthetic images made from each background tile")
    background_splits: list[str] = Field(default_factory=lambda: ["train"])
    max_overlap: float = Field(0.05, ge=0.0, le=1.0, description="max IoA of a paste with any other box")
    placement_tries: int = Field(40, ge=1)
    exclude_edge_bands: bool = Field(True, description="ground views: no pastes on uniform-colour bands along the "
                                     "frame's edges (a camera's date banner, letterbox bars), which are not habitat")
    keep_existing_labels: bool = True
    synthetic_ratio: float = Field(0.5, ge=0.0, le=1.0, description="hint for the detector trainer")
    seed: int = 0
    mask: MaskConfig = Field(default_factory=MaskConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    count: CountConfig = Field(default_factory=CountConfig)
    habitat: HabitatConfig = Field(default_factory=HabitatConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    tile_aug: TileAugConfig = Field(default_factory=TileAugConfig)

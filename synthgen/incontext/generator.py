"""The in-context generator: paints a taxon into a hole in a real tile.

Why: a generator trained from scratch on a few thousand small chips cannot draw a whole scene well
on a CPU, and a chip pasted into a tile carries its own ice, light and halo. Here the tile already
holds the scene: the UNet sees the window with the hole zeroed and the hole's mask (extra input
channels, as diffusers' inpainting UNets take them) and draws only what belongs in the hole; every
pixel outside the hole stays the tile's own. Sizes and orientations come from the training labels
(`shapes.json`), so a painted seal has a real seal's size at the tile's scale.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from pydantic import ConfigDict, Field

from synthgen.config import YamlConfig
from synthgen.errors import SynthgenError
from synthgen.generator import register_generator, write_index
from synthgen.guidance import GuidanceConfig, reference_codes
from synthgen.incontext.windows import (
    WindowConfig,
    context_of,
    corners_of,
    cut_window,
    grow,
    hole_mask,
    on_tile,
)
from synthgen.io_utils import write_json

SHAPES_FILE = "shapes.json"


class PaintConfig(YamlConfig):
    """How holes are painted (sampler, steps, guidance) and blended back into the tile."""

    model_config = ConfigDict(extra="forbid")
    sampler: str = "ddim"
    steps: int = Field(25, ge=1)
    guidance: GuidanceConfig = GuidanceConfig(mode="cfg", scale=1.5)
    feather: float = Field(0.06, ge=0, le=0.5, description="edge blur of the pasted hole, as a fraction of the window")
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    seed: int = 0


class InContextGenerateConfig(PaintConfig):
    """`synthgen generate` for an in-context model: windows of background tiles, painted."""

    backgrounds: Path | None = None  # dataset (data.yaml, ...) whose tiles the animals are painted into
    split: str | None = None  # only this split of the backgrounds (None: all)
    grid: bool = False


@dataclass
class Placement:
    """One animal to paint: its oriented box (4 corners, tile px), lineage and seed."""

    corners: np.ndarray
    taxon: str
    label: str
    lineage: dict[str, str]
    seed: int


def oriented_box(center: tuple[float, float], long: float, short: float, angle: float) -> np.ndarray:
    """Corners of a long x short box centred at `center`, its long axis at `angle` radians."""
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = np.array([ca, sa]) * long / 2, np.array([-sa, ca]) * short / 2
    c = np.asarray(center, float)
    return np.stack([c - u - v, c + u - v, c + u + v, c - u + v])


def sample_placements(tile_wh: tuple[int, int], occupied: list[np.ndarray], shapes: list[list[float]], n: int,
                      margin: float, rng: np.random.Generator, tries: int = 200, propose=None,
                      habitat: np.ndarray | None = None, min_fraction: float = 0.0) -> list[np.ndarray]:
    """Up to n oriented boxes whose grown holes lie on the tile and overlap neither a labelled animal
    (`occupied`, grown the same) nor each other, with at least `min_fraction` of the animal's pixels
    on `habitat` where given. Candidates come from `propose(rng)`, by default a shape drawn from the
    training labels at a uniform place and angle."""
    import cv2
    from shapely.geometry import Polygon

    w, h = tile_wh

    def uniform(rng: np.random.Generator) -> np.ndarray:
        long, short = shapes[int(rng.integers(len(shapes)))]
        return oriented_box((rng.uniform(0, w), rng.uniform(0, h)), long, short, rng.uniform(0, np.pi))

    propose = propose or uniform
    taken = [Polygon(grow(c, margin)) for c in occupied]
    out: list[np.ndarray] = []
    for _ in range(tries):
        if len(out) >= n:
            break
        corners = propose(rng)
        hole = grow(corners, margin)
        if not on_tile(hole, tile_wh):
            continue
        poly = Polygon(hole)
        if any(poly.intersects(t) for t in taken):
            continue
        if habitat is not None:
            m = np.zeros(habitat.shape, np.uint8)
            cv2.fillPoly(m, [np.round(corners).astype(np.int32)], 1)
            if habitat[m > 0].mean() < min_fraction:
                continue
        taken.append(poly)
        out.append(corners)
    return out


@register_generator("incontext")
class InContextGenerator:
    """A taxonomy-conditioned UNet that paints into windows of real tiles."""

    config_class = InContextGenerateConfig

    def __init__(self, model, sched_config: dict, window: WindowConfig, shapes: dict[str, list[list[float]]],
                 taxonomy: dict | None = None, meta: dict | None = None, counts: dict | None = None):
        if model.context_channels != 4:
            raise SynthgenError(f"an in-context model takes 4 context channels; this UNet takes {model.context_channels}")
        self.model, self.sched_config, self.window, self.shapes = model, sched_config, window, shapes
        self.taxonomy, self.meta, self.counts = taxonomy, meta or {}, counts or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> InContextGenerator:
        from synthgen.device import resolve_device
        from synthgen.pipelines.sampling import load_model

        folder = Path(folder)
        model, sched = load_model(folder, resolve_device(device))
        train_cfg = yaml.safe_load((folder / "train_config.yaml").read_text(encoding="utf-8"))
        shapes_file = folder / SHAPES_FILE
        if not shapes_file.exists():
            raise SynthgenError(f"{shapes_file}: missing; {folder} is not a complete in-context model folder")
        tax = folder / "taxonomy.json"
        meta_file = folder / "synthgen_model.json"
        gen = cls(model, sched, WindowConfig.model_validate(train_cfg["window"]),
                  json.loads(shapes_file.read_text(encoding="utf-8")),
                  json.loads(tax.read_text(encoding="utf-8")) if tax.exists() else None,
                  json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else None,
                  json.loads((folder / "taxon_counts.json").read_text(encoding="utf-8")))
        gen.folder = folder
        return gen

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, train_config: str | Path, ema: bool = True,
                        device: str = "auto") -> InContextGenerator:
        """A generator from a training checkpoint (`OUT/checkpoints/step-N`) and the run's config:
        look at samples while a run goes on, or compare EMA with raw weights."""
        from safetensors.torch import load_file

        from synthgen.device import resolve_device
        from synthgen.models import ConditionedUNet, TaxonVocab
        from synthgen.train import TrainConfig
        from synthgen.train.trainer import load_training_data, noise_scheduler

        checkpoint = Path(checkpoint)
        weights = checkpoint / ("ema.safetensors" if ema else "model.safetensors")
        if not weights.exists():
            raise SynthgenError(f"{weights}: not found; point at a `checkpoints/step-N` folder of `synthgen train`")
        cfg = TrainConfig.from_yaml(train_config)
        if cfg.backend != "incontext":
            raise SynthgenError(f"{train_config}: backend {cfg.backend!r}, not an in-context config")
        data = load_training_data(cfg, progress=False)
        model = ConditionedUNet.create(cfg.preset, cfg.image_size, TaxonVocab.from_lineages(data.lineages), cfg.mlp,
                                       context_channels=data.context_channels)
        model.load_state_dict({k: v.to(torch.float32) for k, v in load_file(str(weights)).items()})
        model.eval().to(resolve_device(device))
        counts: dict[str, dict] = {}
        for taxon, lin, label in zip(data.taxa, data.lineages, data.labels, strict=True):
            counts.setdefault(taxon, {"count": 0, "lineage": lin, "label": label})["count"] += 1
        tax = None
        if cfg.taxonomy is not None:
            from taxonomy import Taxonomy

            tax = json.loads(Taxonomy.load(cfg.taxonomy).to_json())
        return cls(model, dict(noise_scheduler(cfg).config), cfg.window, data.shapes, tax,
                   meta={"checkpoint": str(checkpoint), "ema": ema}, counts=counts)

    def save_pretrained(self, folder: str | Path) -> None:
        """The model folder: UNet + taxonomy encoder + scheduler + window + shapes, index last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.cpu().save(folder)
        from diffusers import DDPMScheduler

        DDPMScheduler.from_config(self.sched_config).save_config(folder / "scheduler")
        with open(folder / "train_config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump({"window": self.window.model_dump()}, f)
        write_json(folder / SHAPES_FILE, self.shapes)
        write_json(folder / "taxon_counts.json", self.counts)
        if self.taxonomy is not None:
            write_json(folder / "taxonomy.json", self.taxonomy)
        import hashlib

        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        self.meta = {**self.meta, "backend": "incontext", "id": hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}
        write_json(folder / "synthgen_model.json", self.meta)
        write_index(folder, "incontext", type(self))

    # --- painting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def paint(self, windows: np.ndarray, holes: np.ndarray, lineages: list[dict[str, str]], seeds: list[int],
              cfg: PaintConfig | None = None) -> np.ndarray:
        """Paint each hole: windows uint8 [B,S,S,3], holes {0,1} [B,S,S] -> uint8 [B,S,S,3], pixels
        outside the hole exactly the input's."""
        from synthgen.pipelines.sampling import GuidedSampler

        cfg = cfg or PaintConfig()
        s = self.model.sample_size
        if windows.shape[1:] != (s, s, 3) or holes.shape[1:] != (s, s):
            raise SynthgenError(f"windows must be [B,{s},{s},3] with holes [B,{s},{s}]; got {windows.shape}, {holes.shape}")
        vocab = self.model.vocab
        sampler = GuidedSampler(self.model, self.sched_config, cfg.sampler, cfg.steps)
        out = np.empty_like(windows)
        for a in range(0, len(windows), cfg.batch_size):
            sl = slice(a, a + cfg.batch_size)
            x = torch.from_numpy(windows[sl]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            hole = torch.from_numpy(holes[sl]).float()[:, None]
            codes = torch.tensor([vocab.encode(lin) for lin in lineages[sl]])
            refs = torch.tensor([reference_codes(tuple(c), cfg.guidance.mode, cfg.guidance.reference, vocab.levels)
                                 for c in codes.tolist()])
            noise = torch.stack([torch.randn((3, s, s), generator=torch.Generator().manual_seed(sd)) for sd in seeds[sl]])
            img = sampler(noise, codes, refs, cfg.guidance, context=context_of(x, hole)).numpy()
            m = holes[sl][..., None].astype(bool)
            out[sl] = np.where(m, img, windows[sl])
        return out

    def window_for(self, corners: np.ndarray, tile_wh: tuple[int, int]) -> tuple[tuple[int, int], int]:
        """(origin, native side) of the window centred on a hole, moved inside the tile where it fits."""
        native = self.window.native_side(float((corners.max(0) - corners.min(0)).max()))  # as in training
        c = corners.mean(0)
        origin = []
        for axis, extent in ((0, tile_wh[0]), (1, tile_wh[1])):
            o = round(c[axis] - native / 2)
            origin.append(int(min(max(o, 0), max(extent - native, 0))))
        return (origin[0], origin[1]), native

    def cut(self, tile: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        """(window, hole mask, origin, native side): what the model sees of a hole at `corners`."""
        origin, native = self.window_for(corners, (tile.shape[1], tile.shape[0]))
        s = self.model.sample_size
        return (cut_window(tile, origin, native, s)[0], hole_mask(grow(corners, self.window.margin), origin, native, s),
                origin, native)

    def paint_tile(self, tile: np.ndarray, placements: list[Placement], cfg: PaintConfig | None = None
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The tile with every placement painted in (one batch), and the painted windows (model size)."""
        import cv2

        cfg = cfg or PaintConfig()
        if not placements:
            return tile, []
        h, w = tile.shape[:2]
        wins, holes, where = [], [], []
        for p in placements:
            hole = grow(p.corners, self.window.margin)
            if not on_tile(hole, (w, h)):
                raise SynthgenError(f"hole {np.round(p.corners, 1).tolist()} lies off the {w}x{h} tile")
            rgb, m, origin, native = self.cut(tile, p.corners)
            wins.append(rgb)
            holes.append(m)
            where.append((origin, native, hole))
        painted = self.paint(np.stack(wins), np.stack(holes), [p.lineage for p in placements],
                             [p.seed for p in placements], cfg)
        out = tile.copy()
        for img, (origin, native, hole) in zip(painted, where, strict=True):
            up = cv2.resize(img, (native, native), interpolation=cv2.INTER_CUBIC)
            m = np.zeros((native, native), np.float32)
            cv2.fillPoly(m, [np.round(hole - np.asarray(origin)).astype(np.int32)], 1.0)
            k = cfg.feather * native
            if k > 0:
                m = np.minimum(m, cv2.GaussianBlur(m, (0, 0), k))  # fade inside the hole, never outside it
            x0, y0 = origin
            x1, y1 = min(x0 + native, w), min(y0 + native, h)
            m = m[: y1 - y0, : x1 - x0, None]
            region = out[y0:y1, x0:x1].astype(np.float32)
            out[y0:y1, x0:x1] = np.round(region * (1 - m) + up[: y1 - y0, : x1 - x0] * m).astype(np.uint8)
        return out, list(painted)

    # --- pools ----------------------------------------------------------------------------------
    def generate(self, taxon: str, n: int, out: str | Path, config: InContextGenerateConfig | None = None,
                 progress: bool = True):
        """A resumable pool of `n` painted windows of `taxon`: each index draws its own background
        tile, place, size and noise from its seed, so it can be remade alone."""
        from tqdm.auto import tqdm

        from detection import read_dataset
        from synthgen.io_utils import JsonlAppender, atomic_save_image, read_jsonl
        from synthgen.pipelines.generate import GenerateResult, allot, image_seed, resolve_targets, slug

        cfg = config or InContextGenerateConfig()
        if n < 1:
            raise SynthgenError(f"the number of images must be at least 1, got {n}")
        if cfg.backgrounds is None:
            raise SynthgenError("an in-context model paints into real tiles: pass --backgrounds DATA (a dataset "
                                "such as ../shared/data/glacierbay-seals/data.yaml)")
        folder = getattr(self, "folder", None)
        if folder is None:
            raise SynthgenError("generate needs a model folder (save_pretrained, then load_generator)")
        targets = resolve_targets(folder, taxon)
        out = Path(out)
        settings = {"sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance.record(),
                    "model": self.meta.get("id"), "backgrounds": str(cfg.backgrounds), "split": cfg.split}
        manifest = out / "manifest.jsonl"
        done = set()
        for r in read_jsonl(manifest):
            if r.get("query", "").lower() != taxon.lower():
                continue
            if any(r.get(k) != v for k, v in settings.items()):
                raise SynthgenError(f"{manifest}: holds {taxon!r} windows made with other settings; use another --out")
            if (out / r["file"]).exists():
                done.add(r["index"])
        todo = [i for i in range(n) if i not in done]
        t0, written = time.time(), 0
        if todo:
            import cv2

            ds = read_dataset(cfg.backgrounds)
            if cfg.split is not None:
                if cfg.split not in ds.splits:
                    raise SynthgenError(f"{cfg.backgrounds}: no split {cfg.split!r} (has {', '.join(ds.splits)})")
                ds = ds.subset(cfg.split)
            paths = sorted(ds.images.image_path)
            if not paths:
                raise SynthgenError(f"{cfg.backgrounds}: no images to paint into")
            boxes = {p: [corners_of(b) for b in g.itertuples()] for p, g in ds.boxes.groupby("image_path")}
            plan = allot(targets, max(todo) + 1)
            sub = slug(taxon)
            bar = tqdm(total=len(todo), desc=f"paint {taxon}", unit="img", disable=not progress)
            with JsonlAppender(manifest) as app:
                for a in range(0, len(todo), cfg.batch_size):
                    batch = []
                    for i in todo[a : a + cfg.batch_size]:
                        seed = image_seed(cfg.seed, taxon, i)
                        rng = np.random.default_rng(seed)
                        tg = plan[i]
                        shapes = self.shapes.get(tg.label) or next(iter(self.shapes.values()))
                        for _ in range(20):  # a tile with room for the animal
                            path = paths[int(rng.integers(len(paths)))]
                            tile = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                            h, w = tile.shape[:2]
                            places = sample_placements((w, h), boxes.get(path, []), shapes, 1, self.window.margin, rng)
                            if places:
                                break
                        else:
                            raise SynthgenError(f"{cfg.backgrounds}: found no room for a {tg.label} in 20 tiles")
                        rgb, hole, origin, native = self.cut(tile, places[0])
                        batch.append((i, seed, tg, path, places[0], origin, native, rgb, hole))
                    painted = self.paint(np.stack([b[7] for b in batch]), np.stack([b[8] for b in batch]),
                                         [b[2].lineage for b in batch], [b[1] for b in batch], cfg)
                    for (i, seed, tg, path, corners, origin, native, _, _), img in zip(batch, painted, strict=True):
                        rel = f"{sub}/{sub}_{i:06d}.png"
                        atomic_save_image(Image.fromarray(img), out / rel)
                        app.write({"file": rel, "index": i, "query": taxon, "label": tg.label, "taxon": tg.taxon,
                                   "lineage": tg.lineage, "seed": seed, "size": self.model.sample_size, **settings,
                                   "source": path, "origin": list(origin), "native": native,
                                   "corners": np.round(corners, 2).tolist()})
                        written += 1
                    bar.update(len(batch))
            bar.close()
        grids = [write_sheet(out, taxon)] if cfg.grid else []
        return GenerateResult(out, written, len(done), time.time() - t0, grids)


def write_sheet(out: Path, query: str) -> Path:
    """A contact sheet of the pool's windows of `query` (first 64), under OUT/grids/."""
    from synthgen.io_utils import read_jsonl
    from synthgen.pipelines.generate import contact_sheet, slug

    rows = [r for r in read_jsonl(out / "manifest.jsonl") if r.get("query", "").lower() == query.lower()]
    rows.sort(key=lambda r: r["index"])
    path = out / "grids" / f"{slug(query)}.png"
    contact_sheet([out / r["file"] for r in rows], f"{query}: painted windows", path)
    return path

"""`synthgen generate`: resumable, reproducible generation of labelled chips for one taxon.

manifest.jsonl is the source of truth: an index is done when its row exists and its PNG is there.
Every image has its own seed (noise from its own torch.Generator), so it can be regenerated alone.
Each row records the guidance window its image was sampled with (`guidance_window`): the configured
one, or with `window_from_branch_points` the branch point of the level where its taxon parts from
its guidance reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from pydantic import ConfigDict, Field
from tqdm.auto import tqdm

from synthgen.branching import BRANCH_FILE, load_branch_points, target_window
from synthgen.config import YamlConfig
from synthgen.device import resolve_device
from synthgen.errors import SynthgenError
from synthgen.guidance import GuidanceConfig, reference_codes
from synthgen.io_utils import JsonlAppender, atomic_save_image, read_jsonl
from synthgen.pipelines.sampling import SAMPLERS, GuidedSampler, load_model


class GenerateConfig(YamlConfig):
    """How a pixel model samples a pool (YAML or `synthgen generate` flags)."""

    model_config = ConfigDict(extra="forbid")
    sampler: str = "ddim"
    steps: int = Field(25, ge=1)
    guidance: GuidanceConfig = GuidanceConfig()
    batch_size: int = Field(64, ge=1)
    device: str = "auto"
    seed: int = 0
    even: bool = False  # above the leaves: sample trained taxa evenly, not by training counts
    grid: bool = False
    compile: bool = False
    # DeepCache: full UNet every k-th step, shallow path reusing its deep features between. 1 (exact)
    # by default: 3-5 measured ~1.7-2x faster at 1-1.5/255 mean deviation, but only on a briefly
    # trained tiny model, and pools written before this field are resumable only with 1
    cache_interval: int = Field(default=1, ge=1)
    # per target, guide only after it has branched from its reference (branch_points.json of the
    # model, `synthgen branch-points`); guidance.window where the model has none or a level is unmeasured
    window_from_branch_points: bool = False


@dataclass
class GenerateResult:
    out: Path
    written: int
    already: int
    seconds: float
    grids: list[Path]

    def summary(self) -> str:
        grids = f", grids: {', '.join(str(p) for p in self.grids)}" if self.grids else ""
        return (f"{self.written} chips written, {self.already} already done in {self.seconds:.1f}s "
                f"-> {self.out / 'manifest.jsonl'}{grids}")


@dataclass
class Target:
    taxon: str
    label: str
    lineage: dict[str, str]
    weight: float


def slug(name: str) -> str:
    """A taxon name as a folder / file name of a pool."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "taxon"


def _query_lineage(model_dir: Path, query: str) -> tuple[str, str, dict[str, str]] | None:
    """(name, level, lineage) of the query from the model's taxonomy.json (common names etc.)."""
    tax_file = model_dir / "taxonomy.json"
    if not tax_file.exists():
        return None
    try:
        from taxonomy import Taxonomy, TaxonomyError
    except ImportError:
        return None
    tax = Taxonomy.load(tax_file)
    try:
        t = tax.resolve(query)
    except TaxonomyError:
        return None
    return t.name, t.level, {a.level: a.name for a in tax.lineage(t)}


def allot(targets: list[Target], n: int) -> list[Target]:
    """Targets of images 0..n-1 by smooth weighted round-robin: every prefix holds each target in
    proportion to its weight to within one image (`--n 28 --even` over 7 taxa: 4 of each), and image
    i's target does not depend on n, so a resumed or sharded run draws the same."""
    total = sum(tg.weight for tg in targets)
    credit = [0.0] * len(targets)
    out = []
    for _ in range(n):
        credit = [c + tg.weight for c, tg in zip(credit, targets, strict=True)]
        k = max(range(len(targets)), key=credit.__getitem__)
        credit[k] -= total
        out.append(targets[k])
    return out


def resolve_targets(model_dir: str | Path, query: str, even: bool = False) -> list[Target]:
    """Trained taxa at or under `query` (any rank), weighted by training counts or evenly."""
    model_dir = Path(model_dir)
    counts_file = model_dir / "taxon_counts.json"
    if not counts_file.exists():
        raise SynthgenError(f"{counts_file}: missing; {model_dir} is not a complete synthgen model folder")
    counts = json.loads(counts_file.read_text(encoding="utf-8"))
    q = query.strip().lower()
    hits = {}
    # the query as a trained taxon, a dataset label or a name anywhere in a trained lineage
    for taxon, c in counts.items():
        names = [taxon, c.get("label") or "", *c["lineage"].values()]
        if q in (n.lower() for n in names):
            hits[taxon] = c
    known = _query_lineage(model_dir, query)
    if not hits and known:
        name, level, _ = known
        hits = {t: c for t, c in counts.items() if c["lineage"].get(level) == name}
    if not hits:
        trained = sorted(counts)
        if known:  # name the trained taxa sharing the deepest part of the query's lineage
            _, _, lin = known

            def shared(c: dict) -> int:
                return sum(1 for lv, nm in lin.items() if c["lineage"].get(lv) == nm)

            best = max(shared(c) for c in counts.values())
            trained = sorted(t for t, c in counts.items() if shared(c) == best)
            raise SynthgenError(f"nothing trained under {query!r}; nearest trained taxa: {', '.join(trained)}")
        raise SynthgenError(f"taxon {query!r} is unknown to model {model_dir}; trained taxa: {', '.join(trained)}")
    return [
        Target(t, c.get("label") or t, c["lineage"], 1.0 if even else float(c["count"]))
        for t, c in sorted(hits.items())
    ]


def image_seed(base: int, query: str, index: int) -> int:
    """Stable per-image seed (independent of batch size, process count and resume point)."""
    h = hashlib.sha256(f"{base}|{query.lower()}|{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def contact_sheet(paths: list[Path], title: str, out: Path, max_images: int = 64) -> None:
    """A square sheet of the first `max_images`; the title counts what it shows of how many."""
    total, paths = len(paths), paths[:max_images]
    ims = [Image.open(p).convert("RGB") for p in paths]
    s = ims[0].size[0]
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    pad, head = 2, 14
    sheet = Image.new("RGB", (cols * (s + pad) + pad, rows * (s + pad) + pad + head), "white")
    shown = f"{len(ims)}" if len(ims) == total else f"first {len(ims)} of {total}"
    ImageDraw.Draw(sheet).text((pad, 1), f"{title} ({shown})", fill="black")
    for k, im in enumerate(ims):
        sheet.paste(im, (pad + (k % cols) * (s + pad), head + pad + (k // cols) * (s + pad)))
    atomic_save_image(sheet, out)


def generate(model_dir: str | Path, taxon: str, n: int, out: str | Path, cfg: GenerateConfig | None = None,
             progress: bool = True) -> GenerateResult:
    """Generate indices 0..n-1 of `taxon` into `out` (PNG + manifest rows), skipping those done."""
    from accelerate import PartialState

    cfg = cfg or GenerateConfig()
    if n < 1:
        raise SynthgenError(f"the number of images must be at least 1, got {n}")
    if cfg.sampler not in SAMPLERS:
        raise SynthgenError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    model_dir, out = Path(model_dir), Path(out)
    meta_file = model_dir / "synthgen_model.json"
    if not meta_file.exists():
        raise SynthgenError(f"{meta_file}: missing; train a model with `synthgen train` (or it did not finish)")
    model_id = json.loads(meta_file.read_text(encoding="utf-8"))["id"]
    targets = resolve_targets(model_dir, taxon, cfg.even)
    settings = {
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance.record(),
        "model": model_id,
    }
    if cfg.cache_interval > 1:  # only then: exact rows written before this field existed still match
        settings["cache_interval"] = cfg.cache_interval
    bp = _branch_points(model_dir, cfg)
    if bp is not None:  # which file decided the windows: a recomputed one must not mix into a pool
        settings["branch_points"] = hashlib.sha256(
            (model_dir / BRANCH_FILE).read_bytes()).hexdigest()[:16]
    state = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
    sub = slug(taxon)
    manifest = out / "manifest.jsonl"
    shard = manifest if state.num_processes == 1 else out / f"manifest.rank{state.process_index}.jsonl"
    rows = read_jsonl(manifest) + [r for p in sorted(out.glob("manifest.rank*.jsonl")) for r in read_jsonl(p)]
    done = set()
    for r in rows:
        if r.get("query", "").lower() != taxon.lower():
            continue
        if (any(r.get(k) != v for k, v in settings.items()) or r.get("cache_interval", 1) != cfg.cache_interval
                or r.get("branch_points") != settings.get("branch_points")):
            raise SynthgenError(
                f"{manifest}: holds {taxon!r} images made with other settings ({r.get('sampler')}, {r.get('steps')} steps, "
                f"guidance {r.get('guidance')}, cache interval {r.get('cache_interval', 1)}, "
                f"branch points {r.get('branch_points')}, model {r.get('model')}); use another --out"
            )
        if (out / r["file"]).exists():
            done.add(r["index"])
    for tmp in (out / sub).glob(".*.tmp") if (out / sub).is_dir() else []:
        tmp.unlink()  # temp file of a write that a kill interrupted
    todo = [i for i in range(n) if i not in done][state.process_index :: state.num_processes]

    t0 = time.time()
    written = 0
    if todo:
        device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
        model, sched_cfg = load_model(model_dir, device)
        sampler = GuidedSampler(model, sched_cfg, cfg.sampler, cfg.steps, compile=cfg.compile,
                                cache_interval=cfg.cache_interval)
        vocab, levels = model.vocab, model.vocab.levels
        windows = _target_windows(bp, targets, cfg, vocab)
        plan = allot(targets, max(todo) + 1)
        bar = tqdm(total=len(todo), disable=not (progress and state.is_main_process), desc=f"generate {taxon}", unit="img")
        with JsonlAppender(shard) as app:
            for start in range(0, len(todo), cfg.batch_size):
                idx = todo[start : start + cfg.batch_size]
                seeds = [image_seed(cfg.seed, taxon, i) for i in idx]
                chosen = [plan[i] for i in idx]
                noise = torch.stack([
                    torch.randn((3, model.sample_size, model.sample_size), generator=torch.Generator().manual_seed(s))
                    for s in seeds
                ])
                codes = torch.tensor([vocab.encode(tg.lineage) for tg in chosen])
                refs = torch.tensor([reference_codes(tuple(c), cfg.guidance.mode, cfg.guidance.reference, levels)
                                     for c in codes.tolist()])
                groups: dict[tuple[float, float], list[int]] = {}  # one sampler call per window
                for k, tg in enumerate(chosen):
                    groups.setdefault(windows[tg.taxon][0], []).append(k)
                imgs: list[torch.Tensor] = [torch.empty(0)] * len(idx)
                for w, ks in groups.items():
                    g = cfg.guidance.model_copy(update={"window": w})
                    for k, img in zip(ks, sampler(noise[ks], codes[ks], refs[ks], g), strict=True):
                        imgs[k] = img
                for i, s, tg, img in zip(idx, seeds, chosen, imgs, strict=True):
                    rel = f"{sub}/{sub}_{i:06d}.png"
                    atomic_save_image(Image.fromarray(img.numpy()), out / rel)
                    w, lv = windows[tg.taxon]
                    extra = {"branch_level": lv} if bp is not None else {}
                    app.write({"file": rel, "index": i, "query": taxon, "label": tg.label, "taxon": tg.taxon,
                               "lineage": tg.lineage, "seed": s, "size": model.sample_size, **settings,
                               "guidance_window": list(w), **extra})
                    written += 1
                bar.update(len(idx))
        bar.close()
    state.wait_for_everyone()
    grids: list[Path] = []
    if state.is_main_process:
        if shard != manifest or list(out.glob("manifest.rank*.jsonl")):
            _merge_shards(manifest, out)
        if cfg.grid:
            grids = write_grids(out, taxon)
    return GenerateResult(out, written, len(done), time.time() - t0, grids)


def _branch_points(model_dir: Path, cfg: GenerateConfig) -> dict | None:
    """The model's branch points when the config asks for windows from them (and guidance is on)."""
    if not cfg.window_from_branch_points or cfg.guidance.mode == "none":
        return None
    bp = load_branch_points(model_dir)
    if bp is None:
        warnings.warn(f"{model_dir} has no {BRANCH_FILE} (compute it with `synthgen branch-points`); "
                      f"using the configured guidance window {tuple(cfg.guidance.window)} for every target",
                      stacklevel=3)
    return bp


def _target_windows(bp: dict | None, targets: list[Target], cfg: GenerateConfig, vocab
                    ) -> dict[str, tuple[tuple[float, float], str | None]]:
    """Per target taxon: its guidance window and the level whose branch point gave it (None: configured)."""
    g = cfg.guidance
    out: dict[str, tuple[tuple[float, float], str | None]] = {}
    for tg in targets:
        found = None
        if bp is not None:
            codes = vocab.encode(tg.lineage)
            ref = reference_codes(codes, g.mode, g.reference, vocab.levels)
            found = target_window(bp, [lv for lv, c, r in zip(vocab.levels, codes, ref, strict=True) if c and c != r])
        out[tg.taxon] = found or (tuple(g.window), None)
    if bp is not None and (unmeasured := sorted(t for t, (_, lv) in out.items() if lv is None)):
        ref = g.reference if g.mode == "taxonomic" else "unconditional"
        warnings.warn(f"{BRANCH_FILE} has no branch point at a level where {', '.join(unmeasured)} part(s) from "
                      f"the {ref} reference; using the configured guidance window {tuple(g.window)} there", stacklevel=3)
    return out


def _merge_shards(manifest: Path, out: Path) -> None:
    """Fold per-process manifests into manifest.jsonl (deduplicated by query+index)."""
    seen = {(r["query"].lower(), r["index"]) for r in read_jsonl(manifest)}
    shards = sorted(out.glob("manifest.rank*.jsonl"))
    with JsonlAppender(manifest) as app:
        for p in shards:
            for r in read_jsonl(p):
                if (r["query"].lower(), r["index"]) not in seen:
                    seen.add((r["query"].lower(), r["index"]))
                    app.write(r)
    for p in shards:
        p.unlink()


def write_grids(out: Path, query: str) -> list[Path]:
    """One contact sheet per generated taxon of this query: out/grids/<taxon>.png."""
    rows = [r for r in read_jsonl(out / "manifest.jsonl") if r.get("query", "").lower() == query.lower()]
    by_taxon: dict[str, list[Path]] = {}
    for r in sorted(rows, key=lambda r: r["index"]):
        by_taxon.setdefault(r["taxon"], []).append(out / r["file"])
    paths = []
    for taxon, files in sorted(by_taxon.items()):
        p = out / "grids" / f"{slug(taxon)}.png"
        contact_sheet(files, taxon, p)
        paths.append(p)
    return paths

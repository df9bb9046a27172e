"""The `synthgen` command: parsing and printing only; every command calls the library API.

Each section below belongs to one stage of the pipeline
(taxonomy -> data -> train -> generate -> filter -> compose -> detect -> benchmark).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
console = Console()


def _fail(err: Exception) -> None:
    """Print a library error as one red line and exit 1 (no traceback for user mistakes)."""
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(1)


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
def taxonomy_show_cmd(file: Path = typer.Argument(..., help="taxonomy .csv, .yaml or .json")) -> None:
    """Print the taxonomy as a tree: ranks, common names, dataset labels and body lengths."""
    from rich.tree import Tree

    from synthgen.errors import SynthgenError
    from taxonomy import Taxonomy

    try:
        tax = Taxonomy.load(file)
    except SynthgenError as e:
        _fail(e)
    root = Tree(f"[bold]{file}[/]  levels: {' > '.join(tax.levels)}")
    branches = {}
    for t in tax:  # pre-order: a parent is always drawn before its children
        parent = tax.parent(t)
        branches[t] = (branches[parent] if parent is not None else root).add(_taxon_label(t))
    console.print(root)
    console.print(f"{len(tax)} taxa, {len(tax.labels)} dataset labels, {len(tax.leaves())} leaves")


@taxonomy_app.command("resolve")
def taxonomy_resolve_cmd(
    file: Path = typer.Argument(..., help="taxonomy .csv, .yaml or .json"),
    name: str = typer.Argument(..., help="scientific name, common name or dataset label; rank:name to pick a rank"),
) -> None:
    """Look a name up: rank, lineage, per-level encoding and the BioCLIP text."""
    from synthgen.errors import SynthgenError
    from taxonomy import Taxonomy

    try:
        tax = Taxonomy.load(file)
        t = tax.resolve(name)
        codes = tax.encode(t)
        texts = [tax.bioclip_text(t), tax.bioclip_text(t, common=True)]
    except SynthgenError as e:
        _fail(e)
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


@data_app.command("inspect")
def data_inspect_cmd(
    path: Path = typer.Argument(..., help="dataset folder (data.yaml) or annotation file/folder"),
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    raster: Path | None = typer.Option(None, help="GeoTIFF that a vector file annotates"),
    verify: bool = typer.Option(False, help="decode every image fully (slow) instead of reading headers"),
    on_error: str = typer.Option("raise", help="raise | skip (skip bad files and list them)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the statistics as JSON here"),
) -> None:
    """Images and boxes per split and class, box sizes in pixels, empty images, problems."""
    from detection import read_dataset
    from detection.inspect import inspect_dataset, report_tables
    from synthgen.errors import SynthgenError
    from synthgen.io_utils import write_json

    try:
        stats = inspect_dataset(read_dataset(path, fmt=fmt, raster=raster, on_error=on_error, verify=verify))
    except (SynthgenError, ValueError) as e:
        _fail(e)
    for t in report_tables(stats):
        console.print(t)
    if json_out:
        write_json(json_out, stats)
    sp = stats["splits"]
    console.print(f"{sum(s['images'] for s in sp.values())} images, {sum(s['boxes'] for s in sp.values())} boxes, "
                  f"{len(stats['problems'])} problems in {path}" + (f" -> {json_out}" if json_out else ""))


@data_app.command("chips")
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
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    on_error: str = typer.Option("raise", help="raise | skip"),
) -> None:
    """Cut every real instance into a square context chip (what the generator trains on); resumable."""
    from pydantic import ValidationError

    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips
    from synthgen.errors import SynthgenError

    try:
        cfg = ChipConfig(size=size, margin=margin, pad=pad, min_box=min_box, max_per_class=max_per_class)
        ds = read_dataset(path, fmt=fmt, on_error=on_error, splits=None if split == "all" else [split])
        s = make_chips(ds, out, cfg, taxonomy=taxonomy, split=None if split == "all" else split, on_error=on_error)
    except (SynthgenError, ValidationError, ValueError) as e:
        _fail(e)
    for p in s["problems"]:
        console.print(f"[yellow]skipped[/] {p['file']}{':' + str(p['line']) if p['line'] else ''}: {p['reason']}")
    console.print(f"{s['written']} chips written, {s['already_done']} already done, {s['skipped_small']} too small, "
                  f"{len(s['problems'])} problems -> {s['manifest']}")


@data_app.command("convert")
def data_convert_cmd(
    path: Path = typer.Argument(..., help="dataset folder (data.yaml) or annotation file/folder"),
    out: Path = typer.Option(..., help="output folder (never inside the input)"),
    to: str = typer.Option(..., help="yolo | yolo-obb | coco | voc | csv | gpkg | geojson | shp"),
    fmt: str | None = typer.Option(None, "--format", help=_FMT_HELP),
    raster: Path | None = typer.Option(None, help="GeoTIFF that a vector input annotates"),
    copy_images: bool = typer.Option(False, help="copy images into YOLO output instead of symlinking"),
    on_error: str = typer.Option("raise", help="raise | skip"),
) -> None:
    """Convert annotations between formats (boxes kept in pixels; vector output in the raster's CRS)."""
    from detection import read_dataset, write_dataset
    from synthgen.errors import SynthgenError

    try:
        ds = read_dataset(path, fmt=fmt, raster=raster, on_error=on_error)
        dest = write_dataset(ds, out, to, images="copy" if copy_images else "link")
    except (SynthgenError, ValueError) as e:
        _fail(e)
    console.print(f"{len(ds.images)} images, {len(ds.boxes)} boxes, {len(ds.problems)} skipped -> {dest}")


@app.command("demo")
def demo_cmd(
    data: Path = typer.Option(Path("../shared/data"), help="folder holding aquarium/ and glacierbay-seals/"),
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
) -> None:
    """The main job end to end on the shared data (for now: inspect, taxonomy, chips); resumable."""
    from synthgen.demo import run_demo
    from synthgen.errors import SynthgenError

    try:
        s = run_demo(data, out)
    except SynthgenError as e:
        _fail(e)
    console.print(f"demo: {s['datasets']} datasets, {s['chips']} chips -> {s['summary']}")


# --- train / generate (diffusion) ------------------------------------------------------------


# --- filter / evaluate-samples / train-judge -------------------------------------------------


# --- augment-dataset (compose) --------------------------------------------------------------


# --- train-detector / detect / benchmark ----------------------------------------------------
@app.command("train-detector")
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
) -> None:
    """Train a YOLO detector offline; the synthetic share of each batch is set by a ratio."""
    from detection.train import DetectorTrainConfig, train_detector
    from synthgen.errors import SynthgenError

    try:
        base = DetectorTrainConfig.from_yaml(config) if config else DetectorTrainConfig()
        flags = dict(model=model, imgsz=imgsz, epochs=epochs, batch=batch, seed=seed, device=device,
                     synthetic_ratio=synthetic_ratio)
        cfg = DetectorTrainConfig(**(base.model_dump() | {k: v for k, v in flags.items() if v is not None}
                                     | {"data": str(data)}))
        best = train_detector(cfg, out)
    except (SynthgenError, ValueError) as e:
        _fail(e)
    console.print(f"trained {cfg.model} for {cfg.epochs} epochs -> {best}")


@app.command("detect")
def detect_cmd(
    model: Path = typer.Option(..., help="best.pt or best.safetensors from train-detector"),
    source: Path = typer.Option(..., help="image, GeoTIFF or folder"),
    out: Path = typer.Option(..., help="output folder (predictions.csv, predictions.coco.json, *.gpkg)"),
    tile: int = typer.Option(640, help="tile size in pixels"),
    overlap: float = typer.Option(0.2, help="tile overlap fraction"),
    batch: int = typer.Option(8, help="tiles per forward pass"),
    conf: float = typer.Option(0.25, help="score threshold"),
    merge: str = typer.Option("nmm", help="merge of duplicates at tile borders: nmm | nms"),
    merge_threshold: float = typer.Option(0.5, help="IoS (nmm) or IoU (nms) threshold"),
    device: str = typer.Option("auto"),
) -> None:
    """Sliced inference over large frames and GeoTIFFs (CSV, COCO, GeoPackage in map coordinates)."""
    from detection.infer import SliceConfig, detect
    from synthgen.errors import SynthgenError

    try:
        cfg = SliceConfig(tile=tile, overlap=overlap, batch=batch, conf=conf, merge=merge,
                          merge_threshold=merge_threshold)
        s = detect(model, source, out, cfg, device=device)
    except SynthgenError as e:
        _fail(e)
    console.print(f"{s['detections']} detections in {s['images']} images -> {s['out']}")


@app.command("benchmark")
def benchmark_cmd(
    config: Path = typer.Option(..., help="configs/benchmarks/NAME.yaml"),
    scale: str = typer.Option("cpu", help="scale from the config: cpu | gpu"),
    out: Path | None = typer.Option(None, help="report folder (default benchmarks/results/NAME)"),
    work: Path | None = typer.Option(None, help="stage cache (default runs/benchmarks/NAME/SCALE)"),
    device: str = typer.Option("auto"),
) -> None:
    """Run (or resume) the benchmark: does synthetic data beat real-only on real held-out images?"""
    from synthgen.benchmark import run_benchmark
    from synthgen.errors import SynthgenError

    try:
        res = run_benchmark(config, scale, out, work, device=device)
    except SynthgenError as e:
        _fail(e)
    dest = out or Path("benchmarks/results") / res["name"]
    console.print(f"{len(res['runs'])} detectors evaluated ({res['stages']['ran']} stages run, "
                  f"{res['stages']['cached']} cached) -> {dest / 'report.md'}")



if __name__ == "__main__":
    app()

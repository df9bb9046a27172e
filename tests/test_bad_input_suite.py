"""The bad-input suite: broken copies of the shared datasets, built at run time in tmp_path (a few
images each, never committed), each run through the CLI as a user would.

Every case asserts the exit code, that the message is ONE line naming the file (and the line where
there is one), and that no byte of the input folder changed (sha256 of every file, after every
command). The shared data itself is only read."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import patch_jpeg_size
from typer.testing import CliRunner

from cli import app
from detection import read_data_yaml


def _sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _yolo_copy(src: Path, dst: Path, n: int = 3) -> Path:
    """The first `n` train images of a shared YOLO dataset with their labels, as plain writable files."""
    dy = read_data_yaml(src / "data.yaml")
    for sub in ("images", "labels"):
        (dst / "train" / sub).mkdir(parents=True)
    for img in dy.image_files("train")[:n]:
        shutil.copyfile(img, dst / "train" / "images" / img.name)
        shutil.copyfile(src / "train" / "labels" / f"{img.stem}.txt", dst / "train" / "labels" / f"{img.stem}.txt")
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(dy.names))
    (dst / "data.yaml").write_text(f"path: .\ntrain: train/images\nnames:\n{names}")
    return dst


def _images(root: Path) -> list[Path]:
    return sorted((root / "train" / "images").iterdir())


def _label(img: Path) -> Path:
    return img.parent.parent / "labels" / f"{img.stem}.txt"


def _set_line(lab: Path, n: int, text: str) -> None:
    lines = lab.read_text().splitlines()
    lines[n - 1] = text
    lab.write_text("\n".join(lines) + "\n")


# --- the broken copies: each returns (input folder, {name: path} used in the expected messages) ---
def nan_coordinate(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    lab = _label(_images(root)[1])
    _set_line(lab, 2, "0 0.5 nan 0.1 0.1")
    return root, {"lab": lab}


def class_id_inf(data: Path, tmp: Path):
    root = _yolo_copy(data / "glacierbay-seals", tmp / "in")
    lab = _label(_images(root)[0])
    _set_line(lab, 1, "inf 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2")
    return root, {"lab": lab}


def class_id_nan(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    lab = _label(_images(root)[0])
    _set_line(lab, 1, "nan 0.5 0.5 0.1 0.1")
    return root, {"lab": lab}


def unknown_class_id(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    lab = _label(_images(root)[2])
    _set_line(lab, 1, "9 0.5 0.5 0.1 0.1")
    return root, {"lab": lab}


def zero_size_box(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    lab = _label(_images(root)[0])
    _set_line(lab, 1, "0 0.5 0.5 0 0.1")
    return root, {"lab": lab}


def geojson_projected_no_crs(data: Path, tmp: Path):
    """Projected UTM metres in a GeoJSON without `crs` member, which by the standard means WGS84."""
    root = tmp / "in"
    root.mkdir()
    shutil.copyfile(data / "geo" / "OSBS_029.tif", root / "OSBS_029.tif")
    ring = [[404220, 3285120], [404224, 3285120], [404224, 3285124], [404220, 3285124], [404220, 3285120]]
    fc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon",
          "coordinates": [ring]}, "properties": {"label": "Tree", "image_path": "OSBS_029.tif"}}]}
    (root / "boxes.geojson").write_text(json.dumps(fc))
    return root, {"file": root / "boxes.geojson"}


def jpeg_header_mismatch(data: Path, tmp: Path):
    """A 1024x768 JPEG whose header says 4096x4096: it decodes without error into mostly grey."""
    root = _yolo_copy(data / "aquarium", tmp / "in")
    img = _images(root)[0]
    patch_jpeg_size(img, 4096, 4096)
    return root, {"img": img}


def decompression_bomb(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    img = _images(root)[1]
    patch_jpeg_size(img, 20000, 20000)
    return root, {"img": img}


def truncated_jpeg(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    img = _images(root)[1]
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 3])
    return root, {"img": img}


def same_stem(data: Path, tmp: Path):
    """a.jpg and a.png in one folder: both would read a.txt."""
    from PIL import Image

    root = _yolo_copy(data / "aquarium", tmp / "in")
    img = _images(root)[0]
    Image.open(img).save(img.with_suffix(".png"))
    return root, {"lab": _label(img)}


def missing_image(data: Path, tmp: Path):
    """A DeepForest CSV whose image is not there."""
    root = tmp / "in"
    root.mkdir()
    shutil.copyfile(data / "geo" / "OSBS_029.csv", root / "train.csv")
    return root, {"img": root / "OSBS_029.tif"}


def bad_data_yaml(data: Path, tmp: Path):
    root = _yolo_copy(data / "aquarium", tmp / "in")
    (root / "data.yaml").write_text("path: .\ntrain: train/images\nnames: [fish, shark\n")
    return root, {"file": root / "data.yaml"}


def unknown_format(data: Path, tmp: Path):
    root = tmp / "in"
    root.mkdir()
    shutil.copyfile(data / "aquarium" / "README.md", root / "README.md")
    return root, {"file": root}


def pixel_shapefile(data: Path, tmp: Path):
    """Boxes in image pixels with y negated, no .prj, over a plain PNG (the layout of some aerial bird sets)."""
    import geopandas as gpd
    from PIL import Image
    from shapely.geometry import box

    root = tmp / "in"
    root.mkdir()
    Image.open(data / "geo" / "AWPE_Pigeon_Lake_2020_DJI_0005.JPG").save(root / "colony.png")
    gdf = gpd.GeoDataFrame({"label": ["pelican", "pelican"]},
                           geometry=[box(100, -220, 140, -200), box(500, -900, 530, -860)], crs=None)
    with pytest.warns(UserWarning, match="crs"):  # pyogrio warns that the file has no CRS: the point here
        gdf.to_file(root / "colony.shp")
    assert not (root / "colony.prj").exists()
    return root, {"file": root / "colony.shp"}


IN, OUT = "{in}", "{out}"
# case -> (builder, [(command args, exit code, pattern of THE one line naming the file)]).
# Commands that stop (exit 1, --on-error raise) must print nothing but that line.
CASES: dict[str, tuple[Callable, list[tuple[list[str], int, str]]]] = {
    "nan coordinate": (nan_coordinate, [
        (["data", "inspect", IN], 1, r"^{lab}:2: non-finite number"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {lab}:2: non-finite number"),
        (["data", "chips", IN, "--out", OUT], 1, r"^error: {lab}:2: non-finite number"),
        (["data", "convert", IN, "--out", OUT, "--to", "coco"], 1, r"^error: {lab}:2: non-finite number"),
    ]),
    "class id inf": (class_id_inf, [
        (["data", "inspect", IN, "--on-error", "raise"], 1, r"^error: {lab}:1: non-finite number"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {lab}:1: non-finite number"),
    ]),
    "class id nan": (class_id_nan, [
        (["data", "inspect", IN], 1, r"^{lab}:1: non-finite number"),
        (["data", "chips", IN, "--out", OUT], 1, r"^error: {lab}:1: non-finite number"),
    ]),
    "unknown class id": (unknown_class_id, [
        (["data", "inspect", IN, "--on-error", "raise"], 1, r"^error: {lab}:1: class id 9 not in data.yaml names"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {lab}:1: class id 9"),
    ]),
    "zero-size box": (zero_size_box, [
        (["data", "inspect", IN], 1, r"^{lab}:1: zero-size box"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {lab}:1: zero-size box"),
    ]),
    "GeoJSON, projected, no crs": (geojson_projected_no_crs, [
        (["data", "convert", IN + "/boxes.geojson", "--out", OUT, "--to", "gpkg"], 1,
         r"^error: {file}: coordinate 404220,3285120 is outside longitude/latitude"),
        (["data", "inspect", IN + "/boxes.geojson"], 1, r"^error: {file}: coordinate"),
    ]),
    "JPEG header disagrees with pixels": (jpeg_header_mismatch, [
        (["data", "inspect", IN, "--verify"], 1, r"^{img}: header says 4096x4096 but the pixel data ends at row"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {img}: header says 4096x4096"),
        (["data", "chips", IN, "--out", OUT + "2"], 1, r"^error: {img}: header says 4096x4096"),
    ]),
    "decompression bomb": (decompression_bomb, [
        (["data", "inspect", IN], 1, r"^{img}: over Pillow's pixel limit"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {img}: over Pillow's pixel limit"),
        (["data", "convert", IN, "--out", OUT + "2", "--to", "csv"], 1, r"^error: {img}: over Pillow's pixel limit"),
    ]),
    "truncated JPEG": (truncated_jpeg, [
        (["data", "inspect", IN, "--verify"], 1, r"^{img}: cannot read image"),
        (["data", "chips", IN, "--out", OUT], 1, r"^error: {img}: cannot read image"),
    ]),
    "two images, one stem": (same_stem, [
        (["data", "inspect", IN], 1, r"^{lab}: one label file for 2 images with one stem"),
        (["data", "chips", IN, "--out", OUT, "--on-error", "skip"], 0, r"skipped {lab}: one label file for 2"),
    ]),
    "missing image": (missing_image, [
        (["data", "inspect", IN], 1, r"^{img}: image not found"),
        (["data", "convert", IN, "--out", OUT, "--to", "coco"], 1, r"^error: {img}: image not found"),
    ]),
    "bad data.yaml": (bad_data_yaml, [
        (["data", "inspect", IN], 1, r"^error: {file}:\d+: not valid YAML"),
        (["data", "chips", IN, "--out", OUT], 1, r"^error: {file}:\d+: not valid YAML"),
    ]),
    "unknown format": (unknown_format, [
        (["data", "convert", IN, "--out", OUT, "--to", "coco"], 1, r"^error: {file}: cannot tell the annotation "
         r"format; pass --format"),
    ]),
    "pixel-coordinate shapefile": (pixel_shapefile, [
        (["data", "convert", IN + "/colony.shp", "--out", OUT, "--to", "csv"], 0,
         r"^note: {file}: no CRS on it or on colony.png: boxes read as image pixel coordinates, y negated"),
        (["data", "convert", IN + "/colony.shp", "--out", OUT + "2", "--to", "csv", "--pixel-y", "down"], 1,
         r"^error: {file}: feature 1: outside raster colony.png"),
    ]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, shared_data, tmp_path):
    build, commands = CASES[case]
    root, where = build(shared_data, tmp_path)
    before = _sha(root)
    for args, code, pattern in commands:
        args = [a.replace(IN, str(root)).replace(OUT, str(tmp_path / "out")) for a in args]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == code, f"{args}: {r.output}"
        assert r.exception is None or isinstance(r.exception, SystemExit), f"{args}: {r.exception!r}"
        want = re.compile(pattern.format(**{k: re.escape(str(v)) for k, v in where.items()}))
        shown = _shown(r.stdout)
        hits = [ln for ln in shown if want.search(ln)]
        assert len(hits) == 1, f"{args}: want one line matching {want.pattern}, got:\n{r.output}"
        if code == 1 and hits[0].startswith("error:"):
            assert shown == hits, f"{args}: more than one line:\n{r.output}"
        assert not _shown(r.stderr), f"{args}: stderr shows more than a progress bar:\n{r.stderr}"
        assert _sha(root) == before, f"{args} changed the input"
        if code == 0:
            _check_outcome(case, args, r.output, tmp_path / "out", where)


def _shown(output: str) -> list[str]:
    """The non-blank lines a terminal shows: a progress bar redrawn with \\r keeps only its last state
    (stdout and stderr are taken apart: the runner captures them with separate buffers)."""
    return [ln.rsplit("\r", 1)[-1].rstrip() for ln in output.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


def _check_outcome(case: str, args: list[str], output: str, out: Path, where: dict[str, Path]) -> None:
    """What a command that went on must have done: chip rows that match chip files and none from the
    bad image; every good box kept; pixel boxes where they were drawn."""
    if args[1] == "chips":
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert rows and len(rows) == len({r["file"] for r in rows}) == len(list(out.rglob("*.png")))
        assert f"{len(rows)} chips written" in output
        bad = where.get("img", where.get("lab"))
        from_bad = [r for r in rows if Path(r["source_image"]).stem == bad.stem]
        # a zero-size box drops only itself: its image's good boxes are still cut
        assert bool(from_bad) == (case == "zero-size box"), from_bad
    if case == "zero-size box" and args[1] == "inspect":
        assert re.search(r"^3 images, \d+ boxes, 1 problems", output, re.M), output
    if case == "pixel-coordinate shapefile":
        csv = (out / "train.csv").read_text().splitlines()
        assert csv[1].endswith(",100.0,200.0,140.0,220.0,pelican") and csv[2].endswith(",500.0,860.0,530.0,900.0,pelican")

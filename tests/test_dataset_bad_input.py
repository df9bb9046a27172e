"""Each kind of bad input gives a DataError naming file and line, or is skipped and listed.

Bad copies are built in tmp_path from a few real aquarium images; the shared data is never touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import rasterio
from typer.testing import CliRunner

from cli import app
from detection import DataError, read_dataset, write_dataset


@pytest.fixture(scope="module")
def small(aquarium):
    ds = read_dataset(aquarium, splits=["train"])
    return ds.subset(images=sorted(ds.images.image_path)[:3])


@pytest.fixture
def copy(small, tmp_path) -> Path:
    """A real 3-image YOLO dataset (images copied) that a test may break."""
    return write_dataset(small, tmp_path / "ds", "yolo", images="copy").parent


def _labels(root: Path) -> list[Path]:
    return sorted((root / "train" / "labels").glob("*.txt"))


def _set_line(lab: Path, n: int, text: str) -> None:
    lines = lab.read_text().splitlines()
    lines[n - 1] = text
    lab.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("bad, match", [
    ("0 0.5 0.5 0.1", r"expected 5 fields"),
    ("9 0.5 0.5 0.1 0.1", r"class id 9 not in data.yaml names"),
    ("0 1.2 0.5 0.1 0.1", r"outside \[0, 1\]"),
    ("0 0.5 abc 0.1 0.1", r"non-numeric"),
])
def test_bad_label_line(copy, bad, match):
    lab = _labels(copy)[1]
    _set_line(lab, 2, bad)
    with pytest.raises(DataError, match=match) as e:
        read_dataset(copy)
    assert f"{lab}:2:" in str(e.value) and e.value.line == 2
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 2 and lab.stem not in "".join(ds.images.image_path)
    assert ds.problems == [{"file": str(lab), "line": 2, "reason": e.value.reason}]


def test_missing_label_file_is_an_empty_image(copy):
    from detection.inspect import inspect_dataset

    _labels(copy)[0].unlink()
    st = inspect_dataset(read_dataset(copy))["splits"]["train"]
    assert (st["images"], st["empty_images"], st["missing_label_files"]) == (3, 1, 1)


def test_small_overshoot_tolerated(copy):
    """Exporters round: up to 0.02 outside [0, 1] is accepted and clipped."""
    _set_line(_labels(copy)[0], 1, "0 0.995 0.5 0.02 0.1")
    ds = read_dataset(copy)
    assert ds.boxes.xmax.max() <= ds.images.width.max()


def test_corrupt_image(copy):
    img = sorted((copy / "train" / "images").iterdir())[0]
    img.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as e:
        read_dataset(copy)
    assert str(img.resolve()) in str(e.value) or str(img) in str(e.value)
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 2 and len(ds.problems) == 1
    r = CliRunner().invoke(app, ["data", "inspect", str(copy)])  # lists every problem, exits 1
    assert r.exit_code == 1 and "1 problems" in r.output and "cannot read image" in r.output
    assert "2 images" in r.output
    r = CliRunner().invoke(app, ["data", "inspect", str(copy), "--on-error", "raise"])
    assert r.exit_code == 1 and "error:" in r.output and "cannot read image" in r.output
    assert "Traceback" not in r.output


def test_truncated_image_found_only_with_verify(copy):
    img = sorted((copy / "train" / "images").iterdir())[1]
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 3])
    assert len(read_dataset(copy).images) == 3  # the header is intact
    with pytest.raises(DataError, match="cannot read image"):
        read_dataset(copy, verify=True)


def test_bad_data_yaml(copy):
    (copy / "data.yaml").write_text("path: .\ntrain: train/images\nnames: [a, b\n")
    with pytest.raises(DataError, match=r"data.yaml:\d+: not valid YAML"):
        read_dataset(copy)
    (copy / "data.yaml").write_text("path: .\ntrain: nowhere/images\nnames: [fish]\n")
    with pytest.raises(DataError, match="nowhere/images"):
        read_dataset(copy)


def test_bad_csv_row_and_coco(small, tmp_path):
    out = write_dataset(small, tmp_path / "csv", "csv")
    f = out / "train.csv"
    lines = f.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",10,10,5,20,fish"  # xmax < xmin on file line 4
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv:4: zero-size box 10,10,5,20"):
        read_dataset(f)
    (tmp_path / "bad.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DataError, match=r"bad.json:2: not valid JSON"):
        read_dataset(tmp_path / "bad.json")


def test_missing_crs(geo, tmp_path):
    ds = read_dataset(geo / "OSBS_029.csv")
    shp = write_dataset(ds, tmp_path / "shp", "shp") / "train.shp"
    shp.with_suffix(".prj").unlink()
    with pytest.raises(DataError, match="no CRS") as e:
        read_dataset(shp, raster=geo / "OSBS_029.tif")
    assert str(shp) in str(e.value)
    # a raster without CRS cannot take map coordinates either
    tif = tmp_path / "nocrs.tif"
    with rasterio.open(geo / "OSBS_029.tif") as src:
        profile = src.profile | {"crs": None}
        data = src.read()
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(data)
    good = write_dataset(ds, tmp_path / "gpkg", "gpkg") / "train.gpkg"
    with pytest.raises(DataError, match="raster has no CRS") as e:
        read_dataset(good, raster=tif)
    assert str(tif) in str(e.value)


def test_inputs_untouched(small, tmp_path):
    """Reading with errors, writing and skipping never changes a byte of the user's files."""
    src = write_dataset(small, tmp_path / "ds", "yolo", images="copy").parent
    _set_line(_labels(src)[0], 1, "0 0.5 0.5")
    before = {p.relative_to(src): (p.stat().st_mtime_ns, p.read_bytes()) for p in src.rglob("*") if p.is_file()}
    ds = read_dataset(src, on_error="skip")
    write_dataset(ds, tmp_path / "out", "coco")
    after = {p.relative_to(src): (p.stat().st_mtime_ns, p.read_bytes()) for p in src.rglob("*") if p.is_file()}
    assert before == after

"""Each kind of bad input gives a DataError naming file and line, or is skipped and listed.

Bad copies are built in tmp_path from a few real aquarium images; the shared data is never touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import rasterio
from helpers import patch_jpeg_size
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


@pytest.mark.parametrize("bad", ["0 nan 0.5 0.1 0.1", "0 0.5 0.5 inf 0.1", "inf 0.5 0.5 0.1 0.1", "nan 0.5 0.5 0.1 0.1"])
def test_yolo_non_finite_numbers(copy, bad):
    """NaN / inf, as coordinate or class id: one DataError naming file and line, never a NaN box."""
    lab = _labels(copy)[0]
    _set_line(lab, 3, bad)
    with pytest.raises(DataError, match="non-finite number") as e:
        read_dataset(copy)
    assert str(e.value).startswith(f"{lab}:3: ") and "\n" not in str(e.value)
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 2 and ds.problems[0]["line"] == 3 and ds.boxes[["xmin", "ymax"]].notna().all().all()


def test_coco_voc_csv_non_finite_numbers(small, tmp_path):
    import json

    coco = write_dataset(small, tmp_path / "coco", "coco") / "train.json"
    d = json.loads(coco.read_text())
    for bbox in ([float("nan"), 1, 2, 3], [None, 1, 2, 3], [1, 1, float("inf"), 3]):
        d["annotations"][0]["bbox"] = bbox
        coco.write_text(json.dumps(d))  # Python's json writes NaN / Infinity, and reads them back
        with pytest.raises(DataError, match="must be four finite numbers") as e:
            read_dataset(coco)
        assert str(e.value).startswith(f"{coco}: annotation id")
    d["annotations"][0]["bbox"] = [1, 1, 2, 3]
    d["images"][0]["width"] = float("inf")
    coco.write_text(json.dumps(d))
    with pytest.raises(DataError, match="width/height must be positive numbers"):
        read_dataset(coco)

    voc = sorted((write_dataset(small, tmp_path / "voc", "voc") / "train").glob("*.xml"))[0]
    text = voc.read_text()
    voc.write_text(re.sub(r"<xmin>[^<]*", "<xmin>nan", re.sub(r"<width>[^<]*", "<width>inf", text, count=1), count=1))
    with pytest.raises(DataError, match="object 1: needs a <name> and finite <bndbox> numbers") as e:
        read_dataset(voc)
    assert str(e.value).startswith(str(voc))

    f = write_dataset(small, tmp_path / "csv", "csv") / "train.csv"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",10,10,inf,20,fish"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv:3: box needs finite xmin"):
        read_dataset(f)


def test_zero_size_box_drops_only_itself(copy, small):
    """Before: the whole image and its good boxes were dropped with the one bad box."""
    lab = _labels(copy)[0]
    n = len(read_dataset(copy).boxes)
    _set_line(lab, 1, "0 0.5 0.5 0.0 0.1")
    _set_line(lab, 2, "0 1.01 0.5 0.01 0.1")  # within the rounding tolerance, but nothing left once clipped
    with pytest.raises(DataError, match=f"{lab}:1: zero-size box"):
        read_dataset(copy)
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 3 and len(ds.boxes) == n - 2
    assert [p["line"] for p in ds.problems] == [1, 2] and all("zero-size box" in p["reason"] for p in ds.problems)


def test_two_images_one_stem_share_a_label_file(copy):
    from PIL import Image

    img = sorted((copy / "train" / "images").iterdir())[0]
    Image.open(img).save(img.with_suffix(".png"))
    lab = _labels(copy)[0]
    with pytest.raises(DataError, match="one label file for 2 images with one stem") as e:
        read_dataset(copy)
    assert str(e.value).startswith(f"{lab}: ")
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 2 and img.stem not in "".join(ds.images.image_path)  # not counted twice


def test_write_refuses_non_finite_boxes(small, tmp_path):
    ds = small.subset()
    ds.boxes.loc[1, "xmax"] = float("nan")
    with pytest.raises(DataError, match="box coordinates are not finite") as e:
        write_dataset(ds, tmp_path / "out", "yolo")
    assert str(e.value).startswith(ds.boxes.source[1]) and not (tmp_path / "out").exists()


def test_header_that_disagrees_with_pixels(copy):
    """A 1024x768 JPEG whose header says 2048x2048 decodes without error, into grey below its data."""
    from detection import image_size
    from detection.chips import load_rgb

    imgs = sorted((copy / "train" / "images").iterdir())
    for good in imgs:  # real photos never trip the check
        w, h = image_size(good, verify=True)
        assert load_rgb(good).shape == (h, w, 3)
    patch_jpeg_size(imgs[0], 2048, 2048)
    assert image_size(imgs[0]) == (2048, 2048)  # the header alone cannot tell
    for call in (lambda: image_size(imgs[0], verify=True), lambda: load_rgb(imgs[0])):
        with pytest.raises(DataError, match=r"header says 2048x2048 but the pixel data ends at row \d+") as e:
            call()
        assert str(e.value).startswith(str(imgs[0]))
    ds = read_dataset(copy, verify=True, on_error="skip")
    assert len(ds.images) == 2 and ds.problems[0]["file"] == str(imgs[0])


def test_decompression_bomb_is_a_named_problem(copy):
    img = sorted((copy / "train" / "images").iterdir())[1]
    patch_jpeg_size(img, 20000, 20000)
    with pytest.raises(DataError, match="over Pillow's pixel limit") as e:
        read_dataset(copy)
    assert str(e.value).startswith(str(img))
    ds = read_dataset(copy, on_error="skip")
    assert len(ds.images) == 2 and "decompression bomb" in ds.problems[0]["reason"]


def test_format_error_names_the_cli_flag(tmp_path):
    from detection import detect_format

    with pytest.raises(DataError, match="pass --format"):
        detect_format(tmp_path)


def test_inspect_prints_whole_paths_at_80_columns(copy):
    """Before: the problem table cut the file column to '…/lab…' in an 80-column terminal."""
    from rich.console import Console

    from detection.inspect import inspect_dataset, report_tables

    lab = _labels(copy)[2]
    _set_line(lab, 1, "0 0.5 0.5")
    console = Console(width=80, record=True, soft_wrap=True)
    for t in report_tables(inspect_dataset(read_dataset(copy, on_error="skip"))):
        console.print(t)
    assert [ln for ln in console.export_text().splitlines() if ln.startswith(f"{lab}:1: expected 5 fields")]

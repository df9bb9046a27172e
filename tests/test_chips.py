"""Chips: the square-with-context geometry, the manifest contract, taxonomy lineage, resume, and
background chips (negatives for the judge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from detection import DataError, read_dataset
from detection.chips import ChipConfig, cut_chip, make_background_chips, make_chips, square_window
from synthgen.errors import SynthgenError
from synthgen.io_utils import read_jsonl


def test_square_window_and_padding():
    img = np.arange(100 * 80 * 3, dtype=np.uint32).reshape(100, 80, 3).astype(np.uint8)
    # 20x10 box, margin 0.25 -> side 30 centred on (20, 15)
    assert square_window((10, 10, 30, 20), 0.25) == (5, 0, 30)
    chip = cut_chip(img, (10, 10, 30, 20), size=30, margin=0.25)
    np.testing.assert_array_equal(chip, img[0:30, 5:35])
    # off the top-left corner: replicated edge rows/columns
    chip = cut_chip(img, (0, 0, 10, 10), size=20, margin=0.5)  # square (-5, -5) .. (15, 15)
    np.testing.assert_array_equal(chip[5:, 5:], img[0:15, 0:15])
    np.testing.assert_array_equal(chip[0, 5:], img[0, 0:15])
    np.testing.assert_array_equal(chip[:5, :5], np.broadcast_to(img[0, 0], (5, 5, 3)))
    chip = cut_chip(img, (0, 0, 10, 10), size=20, margin=0.5, pad="reflect")
    np.testing.assert_array_equal(chip[4, 5:], img[1, 0:15])  # row -1 mirrors row 1
    assert cut_chip(img, (3, 4, 50, 60), size=64).shape == (64, 64, 3)


@pytest.fixture(scope="module")
def small(aquarium):
    ds = read_dataset(aquarium, splits=["train"])
    return ds.subset(images=sorted(ds.images.image_path)[:4])


def test_manifest_taxonomy_and_resume(small, configs, tmp_path):
    out = tmp_path / "chips"
    inputs = {p: (Path(p).stat().st_mtime_ns, Path(p).read_bytes()) for p in small.images.image_path}
    s = make_chips(small, out, ChipConfig(size=32), taxonomy=configs / "taxonomy" / "aquarium.csv", progress=False)
    rows = read_jsonl(out / "manifest.jsonl")
    big = small.boxes[np.minimum(small.boxes.xmax - small.boxes.xmin, small.boxes.ymax - small.boxes.ymin) >= 4]
    assert s["written"] == len(rows) == len(big) and s["skipped_small"] == len(small.boxes) - len(big)
    assert len({r["file"] for r in rows}) == len(rows)
    r = rows[0]
    assert set(r) == {"file", "source_image", "box", "label", "taxon", "lineage", "split", "size"}
    assert r["file"].startswith(f"train/{r['label']}/") and r["size"] == 32 and r["split"] == "train"
    assert Image.open(out / r["file"]).size == (32, 32)
    fish = next(x for x in rows if x["label"] == "fish")
    assert fish["taxon"] == "Actinopterygii"
    assert fish["lineage"] == {"kingdom": "Animalia", "phylum": "Chordata", "class": "Actinopterygii"}
    assert json.loads((out / "taxonomy.json").read_text())  # the taxonomy used travels with the chips
    # a kill mid-job: the last rows never made it, the final line is torn; their chips are still on disk
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    s2 = make_chips(small, out, ChipConfig(size=32), taxonomy=configs / "taxonomy" / "aquarium.csv",
                    progress=False)
    rows2 = read_jsonl(out / "manifest.jsonl")
    assert s2["written"] == len(rows) - 5 and s2["already_done"] == 5
    assert sorted(x["file"] for x in rows2) == sorted(x["file"] for x in rows)
    assert len(list(out.rglob("*.png"))) == len(rows)
    assert not list(out.rglob(".*.tmp"))
    s3 = make_chips(small, out, ChipConfig(size=32), taxonomy=configs / "taxonomy" / "aquarium.csv",
                    progress=False)
    assert s3["written"] == 0 and s3["total"] == len(rows)
    with pytest.raises(DataError, match="other settings"):
        make_chips(small, out, ChipConfig(size=64), taxonomy=configs / "taxonomy" / "aquarium.csv")
    assert inputs == {p: (Path(p).stat().st_mtime_ns, Path(p).read_bytes()) for p in small.images.image_path}


def test_max_per_class_and_unknown_label(small, seals, configs, tmp_path):
    s = make_chips(small, tmp_path / "capped", ChipConfig(max_per_class=2), progress=False)
    assert all(n <= 2 for n in s["per_label"].values()) and s["written"] == sum(s["per_label"].values())
    rows = read_jsonl(tmp_path / "capped" / "manifest.jsonl")
    assert rows[0]["taxon"] == rows[0]["label"] and rows[0]["lineage"] == {}  # no taxonomy given
    ds = read_dataset(seals, splits=["val"])
    with pytest.raises(SynthgenError, match="seal"):
        make_chips(ds.subset(images=list(ds.images.image_path[:1])), tmp_path / "x", split="val",
                   taxonomy=configs / "taxonomy" / "aquarium.csv")


def test_cli_chips(seals, configs, tmp_path):
    """OBB seals through the CLI: val split, per-taxon folder, one-line summary with the manifest path."""
    out = tmp_path / "seal-chips"
    r = CliRunner().invoke(app, ["data", "chips", str(seals), "--out", str(out), "--size", "48", "--split", "val",
                                 "--max-per-class", "6", "--taxonomy", str(configs / "taxonomy" / "glacierbay-seals.csv")])
    assert r.exit_code == 0, r.output
    assert "6 chips written" in r.output and "manifest.jsonl" in r.output
    rows = read_jsonl(out / "manifest.jsonl")
    assert {x["taxon"] for x in rows} == {"Phoca vitulina"} and rows[0]["lineage"]["species"] == "Phoca vitulina"
    assert all(x["file"].startswith("val/seal/") for x in rows)


def test_chips_from_geotiff_boxes(geo, aquarium, tmp_path):
    """Vector boxes over the GeoTIFF: every tree becomes a chip; an unreadable image is skipped and listed."""
    from detection import write_dataset

    gpkg = write_dataset(read_dataset(geo / "OSBS_029.csv"), tmp_path / "v", "gpkg") / "train.gpkg"
    s = make_chips(read_dataset(gpkg), tmp_path / "chips", ChipConfig(size=32), progress=False)
    assert s["written"] == 61 and s["per_label"] == {"Tree": 61}
    # a JPEG whose header reads but whose pixels are cut off (a partial download)
    src = sorted((aquarium / "train" / "images").iterdir())[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(src.read_bytes()[:4000])
    (tmp_path / "boxes.csv").write_text(f"image_path,xmin,ymin,xmax,ymax,label\n{bad},10,10,60,60,fish\n"
                                        f"{src},10,10,60,60,fish\n")
    ds = read_dataset(tmp_path / "boxes.csv")
    s = make_chips(ds, tmp_path / "chips2", ChipConfig(size=32), on_error="skip", progress=False)
    assert s["written"] == 1 and s["problems"][0]["file"] == str(bad.resolve())
    with pytest.raises(DataError, match="broken.jpg: cannot read image"):
        make_chips(ds, tmp_path / "chips3", ChipConfig(size=32), progress=False)


def test_background_chips_avoid_boxes_match_sizes_and_resume(seals, tmp_path):
    ds = read_dataset(seals, splits=["train"])
    ds = ds.subset(images=sorted(ds.images.image_path)[:40])
    cfg = ChipConfig(size=32, margin=0.15)
    out = tmp_path / "bg"
    s = make_background_chips(ds, out, 30, cfg, progress=False)
    rows = read_jsonl(out / "manifest.jsonl")
    assert s["written"] == len(rows) == 30 and s["unplaced"] == 0
    r = rows[0]
    assert set(r) == {"file", "source_image", "box", "label", "taxon", "background", "split", "size"}  # no lineage
    assert r["label"] == r["taxon"] == "background" and r["background"] is True and r["split"] == "train"
    animal_sides = [square_window((b.xmin, b.ymin, b.xmax, b.ymax), cfg.margin)[2] for b in ds.boxes.itertuples()]
    sizes = ds.images.set_index("image_path")
    for r in rows:
        x0, y0, x1, y1 = r["box"]
        assert x1 - x0 == y1 - y0 and min(animal_sides) <= x1 - x0 <= max(animal_sides)
        assert x0 >= 0 and y0 >= 0 and x1 <= sizes.width[r["source_image"]] and y1 <= sizes.height[r["source_image"]]
        b = ds.boxes[ds.boxes.image_path == r["source_image"]]
        iw = np.minimum(x1, b.xmax) - np.maximum(x0, b.xmin)
        ih = np.minimum(y1, b.ymax) - np.maximum(y0, b.ymin)
        assert not ((iw > 0) & (ih > 0)).any(), r  # touches no seal
        assert r["file"].startswith("train/background/") and Image.open(out / r["file"]).size == (32, 32)
    # the pixels are the window of the source image, resized like an animal chip
    from detection.chips import load_rgb

    np.testing.assert_array_equal(np.asarray(Image.open(out / r["file"])),
                                  cut_chip(load_rgb(r["source_image"]), tuple(r["box"]), 32, 0.0))
    # same seed -> same windows; a killed run resumes without duplicates; other settings are refused
    make_background_chips(ds, tmp_path / "again", 30, cfg, progress=False)
    assert read_jsonl(tmp_path / "again" / "manifest.jsonl") == rows
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:10]))
    s2 = make_background_chips(ds, out, 30, cfg, progress=False)
    assert s2["written"] == 20 and s2["already_done"] == 10 and read_jsonl(out / "manifest.jsonl") == rows
    with pytest.raises(DataError, match="other settings"):
        make_background_chips(ds, out, 31, cfg, progress=False)
    # default count: as many as the animal chips
    s3 = make_background_chips(ds, tmp_path / "auto", None, cfg, progress=False)
    assert s3["written"] == make_chips(ds, tmp_path / "animals", cfg, progress=False)["written"]


def test_cli_background_chips(seals, tmp_path):
    out = tmp_path / "bg"
    r = CliRunner().invoke(app, ["data", "chips", str(seals), "--out", str(out), "--size", "24", "--split", "val",
                                 "--background", "5", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "5 background chips written" in r.output
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == 5 and all(x["file"].startswith("val/background/") and x["size"] == 24 for x in rows)
    assert json.loads((out / "chips.json").read_text())["seed"] == 3


def test_two_images_one_stem_get_their_own_chips(small, tmp_path):
    """a.jpg in two folders (or a.jpg and a.png in a COCO file) once wrote one chip file for two
    manifest rows; now each image has its own chip names and rows match files."""
    from detection import write_dataset

    two = small.subset(images=sorted(small.images.image_path)[:2])
    root = write_dataset(two, tmp_path / "ds", "yolo", images="copy").parent
    first = sorted((root / "train" / "images").iterdir())[1]
    for sub in ("images", "labels"):
        (root / "train" / sub / "x").mkdir()
    src_label = root / "train" / "labels" / f"{first.stem}.txt"
    stem = sorted((root / "train" / "images").glob("*.jpg"))[0].stem
    (root / "train" / "images" / "x" / f"{stem}.jpg").write_bytes(first.read_bytes())
    (root / "train" / "labels" / "x" / f"{stem}.txt").write_bytes(src_label.read_bytes())
    ds = read_dataset(root)
    assert ds.images.image_path.map(lambda p: Path(p).stem).value_counts()[stem] == 2
    s = make_chips(ds, tmp_path / "chips", progress=False)
    rows = read_jsonl(tmp_path / "chips" / "manifest.jsonl")
    files = sorted(str(p.relative_to(tmp_path / "chips")) for p in (tmp_path / "chips").rglob("*.png"))
    assert s["written"] == len(rows) == len(files) == len(ds.boxes) and sorted(r["file"] for r in rows) == files
    assert len({r["source_image"] for r in rows if stem in r["file"]}) == 2


def test_a_misspelt_split_names_the_splits_there_are(seals, tmp_path):
    """`--split tarin` answered "has []": the split filter had read nothing to list."""
    r = CliRunner().invoke(app, ["data", "chips", str(seals), "--out", str(tmp_path / "c"), "--split", "tarin"])
    assert r.exit_code == 1 and "no split 'tarin' (has train, val)" in r.output
    assert len(r.output.strip().splitlines()) == 1
    with pytest.raises(DataError, match=r"has train, val"):
        make_chips(seals, tmp_path / "d", ChipConfig(size=16), split="tarin", progress=False)

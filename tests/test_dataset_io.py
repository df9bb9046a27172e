"""Dataset I/O on the real data: counts from the READMEs, data.yaml handling, format round trips."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from detection import read_data_yaml, read_dataset, save_data_yaml, write_dataset
from detection.inspect import inspect_dataset


def _fingerprint(folder: Path) -> dict:
    """mtime + sha1 of every file under a folder (inputs must come out of every call untouched)."""
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _norm(ds) -> pd.DataFrame:
    """Boxes keyed by image file name and split, sorted, for comparing two readings."""
    b = ds.boxes.assign(name=ds.boxes.image_path.map(lambda p: Path(p).name),
                        **{f"k{c}": ds.boxes[c].round(1) for c in ("xmin", "ymin", "xmax", "ymax")})
    return b.sort_values(["split", "name", "kxmin", "kymin", "kxmax", "kymax", "label"])[
        ["split", "name", "label", "xmin", "ymin", "xmax", "ymax"]].reset_index(drop=True)


def _assert_same_boxes(a, b, tol: float = 0.01) -> None:
    na, nb = _norm(a), _norm(b)
    assert len(na) == len(nb) > 0
    assert na[["split", "name", "label"]].equals(nb[["split", "name", "label"]])
    np.testing.assert_allclose(na[["xmin", "ymin", "xmax", "ymax"]], nb[["xmin", "ymin", "xmax", "ymax"]], atol=tol)


@pytest.fixture(scope="module")
def aquarium_ds(aquarium):
    return read_dataset(aquarium)


@pytest.fixture(scope="module")
def aquarium_small(aquarium_ds):
    """Three train and two val images (every box of them), all classes well mixed."""
    tr = sorted(aquarium_ds.images.image_path[aquarium_ds.images.split == "train"])
    va = sorted(aquarium_ds.images.image_path[aquarium_ds.images.split == "val"])
    return aquarium_ds.subset(images=tr[:3] + va[:2])


def test_aquarium_counts(aquarium_ds):
    st = inspect_dataset(aquarium_ds)
    assert aquarium_ds.fmt == "yolo"
    assert aquarium_ds.names == ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
    assert st["splits"]["train"]["images"] == 448 and st["splits"]["val"]["images"] == 127
    assert st["splits"]["train"]["boxes_per_class"] == {
        "fish": 1961, "jellyfish": 385, "penguin": 330, "puffin": 175, "shark": 259, "starfish": 78, "stingray": 136}
    assert st["splits"]["val"]["boxes_per_class"]["fish"] == 459
    assert set(st["splits"]["train"]["image_sizes"]) <= {"768x1024", "1024x768", "576x1024", "1024x576"}
    sz = st["splits"]["train"]["box_size"]
    assert 0 < sz["w_min"] <= sz["w_median"] <= sz["w_max"] <= 1024


def test_seal_counts_and_obb(seals):
    ds = read_dataset(seals)
    st = inspect_dataset(ds)
    assert ds.fmt == "yolo-obb"
    tr = st["splits"]["train"]
    assert (tr["images"], tr["boxes"], tr["empty_images"], tr["missing_label_files"]) == (1809, 2917, 65, 0)
    assert st["splits"]["val"]["boxes"] == 261
    assert 50 < tr["box_size"]["w_median"] < 75  # README: about 60x65 px median
    # the axis-aligned box is min/max over the corners, clipped; the corners themselves are kept
    b = ds.boxes.iloc[0]
    lab, ln = b.source.rsplit(":", 1)
    v = [float(x) for x in Path(lab).read_text().splitlines()[int(ln) - 1].split()[1:]]
    xs, ys = np.array(v[0::2]) * 640, np.array(v[1::2]) * 640
    np.testing.assert_allclose(b.obb, np.stack([xs, ys], 1).ravel())
    np.testing.assert_allclose([b.xmin, b.ymin, b.xmax, b.ymax],
                               [max(xs.min(), 0), max(ys.min(), 0), min(xs.max(), 640), min(ys.max(), 640)])
    assert (ds.boxes.xmin >= 0).all() and (ds.boxes.xmax <= 640).all()


def test_cli_inspect(aquarium, seals, tmp_path):
    r = CliRunner().invoke(app, ["data", "inspect", str(aquarium), "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    assert "448" in r.output and "1961" in r.output and "fish" in r.output
    assert (tmp_path / "a.json").is_file()
    r = CliRunner().invoke(app, ["data", "inspect", str(seals)])
    assert r.exit_code == 0, r.output
    for n in ("1809", "2917", "65"):
        assert n in r.output


def test_round_trip_yolo_coco_voc_csv(aquarium, aquarium_small, tmp_path):
    before = _fingerprint(aquarium)
    cur = aquarium_small
    for fmt, reader in (("yolo", "yolo"), ("coco", "coco"), ("voc", "voc"), ("csv", "csv"), ("yolo", "yolo")):
        dest = write_dataset(cur, tmp_path / f"{fmt}-{len(list(tmp_path.iterdir()))}", fmt)
        cur = read_dataset(dest, fmt=reader, names=aquarium_small.names)
        _assert_same_boxes(aquarium_small, cur)
        assert sorted(cur.images.split.unique()) == ["train", "val"]
    assert cur.names == aquarium_small.names
    assert _fingerprint(aquarium) == before


def test_obb_round_trip_keeps_corners(seals, tmp_path):
    ds = read_dataset(seals, splits=["val"])
    small = ds.subset(images=sorted(ds.images.image_path)[:4])
    back = read_dataset(write_dataset(small, tmp_path / "obb", "yolo-obb"))
    assert back.fmt == "yolo-obb"
    _assert_same_boxes(small, back)
    np.testing.assert_allclose(np.stack(back.boxes.obb), np.stack(small.boxes.obb), atol=0.01)


def test_data_yaml_variants(aquarium, aquarium_small, tmp_path):
    """names as list, `path` elsewhere, splits as lists of folders and .txt image lists."""
    src = write_dataset(aquarium_small, tmp_path / "y", "yolo", images="copy").parent
    imgs = sorted(str(p) for p in (src / "train" / "images").iterdir())
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("\n".join(imgs[:2]) + "\n")
    (tmp_path / "lists" / "more.txt").write_text(os.path.relpath(imgs[2], tmp_path / "lists") + "\n")
    yml = tmp_path / "cfg" / "data.yaml"
    yml.parent.mkdir()
    yml.write_text(f"path: {tmp_path}\ntrain: [lists/train.txt, lists/more.txt]\nval: [y/val/images]\n"
                   f"names: {aquarium_small.names}\n")
    dy = read_data_yaml(yml)
    assert dy.names == aquarium_small.names and dy.root == tmp_path.resolve()
    ds = read_dataset(yml)
    _assert_same_boxes(aquarium_small, ds)
    save_data_yaml(tmp_path / "w" / "data.yaml", ds.names, {"train": "train/images"})
    assert read_data_yaml(tmp_path / "w" / "data.yaml").names == ds.names
    # the same images in two splits is reported as a leak
    leak = tmp_path / "leak.yaml"
    leak.write_text(f"path: {tmp_path}\ntrain: y/train/images\ntest: y/train/images\n"
                    f"names: {dict(enumerate(aquarium_small.names))}\n")
    st = inspect_dataset(read_dataset(leak))
    assert len(st["images_in_several_splits"]) == 3 and set(st["splits"]) == {"train", "test"}


def test_write_refuses_input_folder(aquarium, aquarium_small):
    from detection import DataError

    with pytest.raises(DataError, match="inside the input folder"):
        write_dataset(aquarium_small, aquarium / "converted", "coco")
    assert not (aquarium / "converted").exists()

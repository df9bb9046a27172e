"""Group-aware splits and stratified, seeded, nested fractions on the real datasets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from detection.dataset import group_ids
from synthgen.benchmark.config import BenchmarkConfig
from synthgen.benchmark.data import load_dataset
from synthgen.benchmark.pipeline import make_split
from synthgen.benchmark.splits import draw_fraction, split_by_group, tile_and_frame_ids
from synthgen.errors import ConfigError

SEAL_PATTERN = r"^(.+?)_jpg\.rf\."
SEAL_FRAME = r"^(.+)_\d+_\d+_jpg\.rf\."


@pytest.fixture(scope="module")
def seal_train(seals):
    images, boxes, _ = load_dataset(seals)
    tr = images[images.split == "train"]
    return tr.assign(group=group_ids(tr.image_path, SEAL_PATTERN)), boxes


@pytest.fixture(scope="module")
def aqua_train(aquarium):
    images, boxes, names = load_dataset(aquarium)
    tr = images[images.split == "train"]
    return tr.assign(group=group_ids(tr.image_path, None)), boxes, names


def test_seal_groups_follow_the_rf_prefix_in_any_case(seal_train):
    images, _ = seal_train
    # 1809 train images are 603 source tiles x 3 Roboflow copies; 1305 are named `_JPG.rf.`, which a
    # case-sensitive pattern left as 1473 groups, putting copies of one tile on both sides of a split
    assert len(images) == 1809 and images.group.nunique() == 603
    assert images.group.value_counts().eq(3).all()
    g = group_ids(["/x/abc_def_jpg.rf.123.jpg", "/x/abc_def_JPG.rf.456.jpg"], SEAL_PATTERN)
    assert g == ["abc_def", "abc_def"]


@pytest.mark.slow
def test_seal_frames_and_test_overlap_pinned(seals, configs, tmp_path):
    """Tiles are cut from drone frames (`<frame>_<x>_<y>`): 322 frames behind train, 118 behind valid,
    65 of those give both; their 555 train images (185 source tiles) are left out of training."""
    images, _, _ = load_dataset(seals)
    tiles, frames = tile_and_frame_ids(list(images.image_path), SEAL_PATTERN, SEAL_FRAME)
    df = images.assign(tile=tiles, frame=frames)
    per = df.groupby("split").agg(images=("image_path", "size"), tiles=("tile", "nunique"),
                                  frames=("frame", "nunique"))
    assert per.loc["train"].tolist() == [1809, 603, 322] and per.loc["val"].tolist() == [151, 151, 118]
    tr, te = df[df.split == "train"], df[df.split == "val"]
    assert len(set(tr.frame) & set(te.frame)) == 65 and not set(tr.tile) & set(te.tile)
    assert (df.tile.str.contains("-") == df.frame.eq(df.tile)).all()  # uuid-named tiles carry no frame

    cfg = BenchmarkConfig.from_yaml(configs / "benchmarks" / "glacierbay-seals.yaml")
    info = make_split(cfg, tmp_path)
    assert info["source"] == {"train": {"images": 1809, "tiles": 603, "frames": 322},
                              "test": {"images": 151, "tiles": 151, "frames": 118}}
    assert info["leak"] == {"frames_shared": 65, "train_images_dropped": 555, "train_tiles_dropped": 185,
                            "tiles_shared": 0}
    table = pd.read_csv(tmp_path / "split.csv")
    assert sum(info["counts"].values()) == 1960 - 555
    sides = table.groupby("group").bench_split.nunique()
    assert (sides == 1).all()  # no frame on two sides: train, val, test


def test_train_val_split_keeps_groups_whole_and_is_deterministic(seal_train):
    images, boxes = seal_train
    side = split_by_group(images, boxes, 0.1, seed=0)
    per_group = pd.DataFrame({"g": images.group, "s": side}).groupby("g").s.nunique()
    assert (per_group == 1).all()  # no source tile on both sides
    val_groups = images.group[side == "val"].nunique()
    assert abs(val_groups / images.group.nunique() - 0.1) < 0.01
    assert side.equals(split_by_group(images, boxes, 0.1, seed=0))
    assert not side.equals(split_by_group(images, boxes, 0.1, seed=1))


def test_fractions_stratified_by_taxon_nested_and_seeded(aqua_train):
    images, boxes, names = aqua_train
    b = boxes[boxes.image_path.isin(set(images.image_path))]
    small = draw_fraction(images, b, 0.1, seed=0)
    assert abs(len(small) / len(images) - 0.1) < 0.03
    present = set(b.label[b.image_path.isin(small)])
    assert present == set(names)  # every taxon, rare ones included, survives a 10% draw
    assert set(small) <= set(draw_fraction(images, b, 0.25, seed=0))  # nested for one seed
    assert small == draw_fraction(images, b, 0.1, seed=0)
    assert small != draw_fraction(images, b, 0.1, seed=1)
    assert len(draw_fraction(images, b, 1.0, seed=3)) == len(images)


def test_fraction_draws_whole_groups(seal_train):
    images, boxes = seal_train
    picked = set(draw_fraction(images, boxes, 0.1, seed=2))
    g = images.assign(p=images.image_path.isin(picked)).groupby("group").p.agg(["min", "max"])
    assert (g["min"] == g["max"]).all()


def test_benchmark_configs_load(configs):
    for name in ("glacierbay-seals", "aquarium"):
        cfg = BenchmarkConfig.from_yaml(configs / "benchmarks" / f"{name}.yaml")
        assert {"smoke", "cpu", "gpu"} <= set(cfg.scales) and cfg.arms.enabled()[0] == "real"
        assert {"pretrain_finetune", "real_long"} <= set(cfg.arms.enabled())  # arm 5 with its control
        assert min(len(cfg.scale(s).seeds) for s in ("cpu", "gpu")) >= 3
        assert 0.1 in cfg.scale("cpu").fractions
        assert {0.1, 0.25, 1.0} <= set(cfg.scale("gpu").fractions)  # the data-saving question
        for sc in cfg.scales.values():  # paths relative to the config file, whatever the working folder
            if sc.compose.get("config"):
                assert Path(sc.compose["config"]).is_file()


def test_benchmark_config_refuses_bad_input_with_one_line(seals, tmp_path):
    def load(text: str) -> str:
        p = tmp_path / "c.yaml"
        p.write_text(f"name: x\ndataset: {seals}\n" + text)
        with pytest.raises(ConfigError) as e:
            BenchmarkConfig.from_yaml(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg
        return msg

    assert "group_pattern" in load("group_pattern: '^(.+)'\n")  # unknown key (the old name) refused
    assert "groups.tile" in load("groups: {tile: '^(.+'}\n")
    assert "groups.frame" in load("groups: {frame: 'no group'}\n")
    assert "arms.incontext.model" in load("arms: {real: {}, incontext: {model: ../nowhere}}\n")
    assert "arms.real" in load("arms: {real: null}\n")
    assert "native.window" in load("scales: {s: {native: {window: 320}, detector: {imgsz: 640}}}\n")

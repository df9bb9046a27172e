"""Group-aware splits and stratified, seeded, nested fractions on the real datasets."""

from __future__ import annotations

import pandas as pd
import pytest

from synthgen.benchmark.config import BenchmarkConfig
from synthgen.benchmark.data import load_dataset
from synthgen.benchmark.splits import draw_fraction, group_ids, split_by_group

SEAL_PATTERN = r"^(.+?)_jpg\.rf\."


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


def test_seal_groups_follow_the_rf_prefix(seal_train):
    images, _ = seal_train
    assert images.group.nunique() == 1473  # README: 1809 train images, 1473 source ids
    g = group_ids(["/x/abc_def_jpg.rf.123.jpg", "/x/abc_def_jpg.rf.456.jpg"], SEAL_PATTERN)
    assert g == ["abc_def", "abc_def"]


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
        assert {"cpu", "gpu"} <= set(cfg.scales) and cfg.arms[0] == "real"
        assert min(len(s.seeds) for s in cfg.scales.values()) >= 3
        assert 0.1 in cfg.scale("cpu").fractions

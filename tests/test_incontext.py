"""The in-context generator: windows cut from real tiles, training, painting into holes, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detection.dataset import group_ids
from synthgen.errors import SynthgenError
from synthgen.incontext.generator import (
    InContextGenerator,
    PaintConfig,
    Placement,
    oriented_box,
    sample_placements,
)
from synthgen.incontext.windows import WindowConfig, cut_window, grow, hole_mask, one_per_group, place_window

SEALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glacierbay-seals"
TAXONOMY = Path(__file__).resolve().parents[1] / "configs" / "taxonomy" / "glacierbay-seals.csv"


def test_source_groups_are_case_insensitive():
    names = ["a_jpg.rf.1.jpg", "A_JPG.rf.2.jpg", "b_JPG.rf.3.jpg", "c.jpg"]
    assert group_ids(names, r"^(.+?)_jpg\.rf\.") == ["a", "a", "b", "c"]
    assert one_per_group(names, r"^(.+?)_jpg\.rf\.") == ["A_JPG.rf.2.jpg", "b_JPG.rf.3.jpg", "c.jpg"]


def test_window_holds_the_instance_inside_the_tile():
    rng = np.random.default_rng(0)
    corners = oriented_box((20, 300), 80, 30, 0.3)
    for _ in range(50):
        x, y = place_window(grow(corners, 0.15), 96, (640, 640), rng)
        assert 0 <= x <= 640 - 96 and 0 <= y <= 640 - 96
        hole = grow(corners, 0.15)
        lo, hi = hole.min(0).clip(0), hole.max(0)
        assert x <= lo[0] and x + 96 >= min(hi[0], 640) and y <= lo[1] and y + 96 >= hi[1]


def test_cut_window_marks_padding():
    tile = np.full((50, 60, 3), 200, np.uint8)
    rgb, valid = cut_window(tile, (-20, 0), 40, 20)
    assert rgb.shape == (20, 20, 3) and valid.shape == (20, 20)
    assert valid[:, :10].sum() == 0 and valid[:, 10:].all()


def test_placements_avoid_animals_and_stay_on_the_tile():
    rng = np.random.default_rng(1)
    occupied = [oriented_box((320, 320), 200, 200, 0.0)]
    places = sample_placements((640, 640), occupied, [[76, 29]], 6, 0.15, rng)
    assert len(places) == 6
    from shapely.geometry import Polygon

    big = Polygon(grow(occupied[0], 0.15))
    for c in places:
        hole = grow(c, 0.15)
        assert hole.min() >= 0 and hole.max() <= 640
        assert not Polygon(hole).intersects(big)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny in-context seal model trained for a few steps on the real seal tiles."""
    from synthgen.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ic")
    cfg = TrainConfig(backend="incontext", data=SEALS / "data.yaml", taxonomy=TAXONOMY, image_size=16,
                      window=WindowConfig(size=16, native=96, context=1.2, jitters=1), preset="tiny",
                      steps_per_stage=3, batch_size=4, warmup_steps=1, checkpoint_every=2, dihedral=True,
                      hflip=False, min_snr_gamma=5.0, threads=1)
    res = train(cfg, root / "model", progress=False)
    assert res.steps == 3
    return root / "model"


@pytest.mark.slow
def test_trained_folder_has_index_shapes_and_loads(tiny_model):
    from synthgen.generator import load_generator, read_index

    assert read_index(tiny_model)["kind"] == "incontext"
    shapes = yaml.safe_load((tiny_model / "shapes.json").read_text())
    long, short = np.median(np.array(shapes["seal"]), 0)
    assert 60 < long < 95 and 20 < short < 40  # the harbour seals' oriented boxes (median 76 x 29 px)
    gen = load_generator(tiny_model, device="cpu")
    assert isinstance(gen, InContextGenerator) and gen.window.native == 96


@pytest.mark.slow
def test_paint_changes_only_the_hole(tiny_model):
    gen = InContextGenerator.from_pretrained(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (200, 240, 3), dtype=np.uint8)
    corners = oriented_box((120, 100), 70, 28, 0.5)
    lineage = next(iter(yaml.safe_load((tiny_model / "taxon_counts.json").read_text()).values()))["lineage"]
    cfg = PaintConfig(steps=2)
    out, windows = gen.paint_tile(tile, [Placement(corners, "Phoca vitulina", "seal", lineage, seed=3)], cfg)
    hole = np.zeros(tile.shape[:2], np.uint8)
    import cv2

    cv2.fillPoly(hole, [np.round(grow(corners, gen.window.margin)).astype(np.int32)], 1)
    outside = cv2.dilate(hole, np.ones((3, 3), np.uint8)) == 0
    assert np.array_equal(out[outside], tile[outside])  # the tile's own pixels, exactly
    assert (out[hole == 1] != tile[hole == 1]).any()
    again, _ = gen.paint_tile(tile, [Placement(corners, "Phoca vitulina", "seal", lineage, seed=3)], cfg)
    assert np.array_equal(out, again)  # one seed, one animal
    # a window-level paint keeps every pixel outside its hole
    win = windows[0][None]
    m = hole_mask(grow(corners, 0.15), gen.window_for(corners, (240, 200))[0], 96, 16)[None]
    painted = gen.paint(win, m, [lineage], [1], cfg)
    assert np.array_equal(painted[m == 0], win[m == 0])


@pytest.mark.slow
def test_bad_input_is_one_line(tiny_model, tmp_path):
    from synthgen.generator import load_generator

    gen = InContextGenerator.from_pretrained(tiny_model, device="cpu")
    tile = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(SynthgenError, match="off the 100x100 tile"):
        gen.paint_tile(tile, [Placement(oriented_box((95, 50), 60, 20, 0.0), "x", "seal", {}, 0)])
    with pytest.raises(SynthgenError, match="model folder not found"):
        load_generator(tmp_path / "nothing")
    with pytest.raises(SynthgenError, match="needs a 'pixel' model"):
        load_generator(tiny_model, kind="pixel")
    with pytest.raises(SynthgenError, match="not an in-context config|backend"):
        InContextGenerator.from_checkpoint(next((tiny_model / "checkpoints").glob("step-*")),
                                           Path(__file__).resolve().parents[1] / "configs/train/tiny.yaml")


def test_padding_is_left_out_of_the_loss():
    from synthgen.train.trainer import diffusion_loss

    pred, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    target[:, :, :, :2] = 5.0  # large error only where the window was padding
    weight = torch.ones(2, 1, 4, 4)
    weight[:, :, :, :2] = 0
    snr = torch.tensor([1.0, 10.0])
    assert diffusion_loss(pred, target, weight, snr, None, "v_prediction") == 0
    assert diffusion_loss(pred, target, None, snr, None, "v_prediction") > 0
    # Min-SNR-gamma (v): min(snr, 5) / (snr + 1) per sample
    full = diffusion_loss(pred, target, None, snr, 5.0, "v_prediction")
    per = (target.pow(2).mean(dim=(1, 2, 3)) * torch.tensor([0.5, 5 / 11])).mean()
    assert torch.isclose(full, per)


@pytest.mark.slow
def test_cli_generate_paints_a_resumable_pool(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from synthgen.io_utils import read_jsonl

    out = tmp_path / "pool"
    args = ["generate", "--model", str(tiny_model), "--taxon", "seal", "--out", str(out), "--steps", "2",
            "--backgrounds", str(SEALS / "data.yaml"), "--split", "val"]
    r = CliRunner().invoke(app, [*args, "--n", "2"])
    assert r.exit_code == 0, r.output
    first = {row["index"]: row for row in read_jsonl(out / "manifest.jsonl")}
    r = CliRunner().invoke(app, [*args, "--n", "3", "--grid"])
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out / "manifest.jsonl")
    assert sorted(row["index"] for row in rows) == [0, 1, 2]  # resumed: nothing painted twice
    assert all(first[i] == row for row in rows if (i := row["index"]) in first)
    assert all((out / row["file"]).exists() and "valid" in row["source"] for row in rows)
    assert (out / "grids" / "seal.png").exists()
    # a taxon the model does not know, and a model of another kind's flag: one line each
    r = CliRunner().invoke(app, [*args, "--n", "1", "--taxon", "Megaptera"])
    assert r.exit_code == 1 and "Megaptera" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, [*args, "--n", "1", "--even"])
    assert r.exit_code == 1 and "even" in r.output


@pytest.mark.slow
def test_augment_dataset_paints_into_tiles(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from synthgen.io_utils import read_jsonl

    out = tmp_path / "aug"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "compose" / "glacierbay-seals.yaml"
    args = ["augment-dataset", str(SEALS / "data.yaml"), "--generator", str(tiny_model), "--out", str(out),
            "--config", str(cfg), "--n-images", "3", "--preview", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "animals painted" in r.output
    rows = [row for row in read_jsonl(out / "manifest.jsonl") if not row.get("empty")]
    prov = read_jsonl(out / "provenance.jsonl")
    assert rows and len(prov) == sum(row["n_pasted"] for row in rows) > 0
    assert all(p["blend"] == "paint" and len(p["obb"]) == 4 for p in prov)
    for row in rows:  # labels: the real seals' and the painted seals' oriented boxes, as polygons
        lines = (out / "labels" / "train" / (Path(row["output"]).stem + ".txt")).read_text().splitlines()
        assert len(lines) == len(row["real"]) + row["n_pasted"] and all(len(x.split()) == 9 for x in lines)
    assert not (out / "labels-seg").exists()  # a hole is not an instance mask
    assert list((out / "previews").glob("*.png"))
    again = CliRunner().invoke(app, args)  # resumed: nothing painted twice
    assert again.exit_code == 0 and len(read_jsonl(out / "provenance.jsonl")) == len(prov)
    both = CliRunner().invoke(app, [*args, "--pool", str(tmp_path)])
    assert both.exit_code == 1 and "not both" in both.output


def test_a_taxon_no_shipped_model_knows_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from synthgen.shipped import model_for, shipped_models

    assert "glacierbay-seals-incontext" in shipped_models()
    assert model_for("Phoca vitulina").name == "glacierbay-seals-incontext"  # any name in its lineage
    assert model_for("seal") == model_for("Phocidae")
    r = CliRunner().invoke(app, ["generate", "--taxon", "Megaptera", "--n", "5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "no shipped model draws 'Megaptera'" in r.output and "synthgen train --config" in r.output
    assert "glacierbay-seals-incontext (Phoca vitulina)" in r.output

"""Transmutation of a real aquarium chip into another taxon with a tiny model: exactness at t=0,
DDIM inversion round trip, branch-point lookup, manifest rows and resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.chips import ChipConfig, make_chips
from synthgen.branching import branch_points
from synthgen.errors import SynthgenError
from synthgen.guidance import GuidanceConfig
from synthgen.io_utils import read_jsonl
from synthgen.models.delta import load_model_folder
from synthgen.train import TrainConfig, train
from synthgen.transmute import TransmuteConfig, transmute, transmute_tensor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(aquarium, tmp_path_factory):
    root = tmp_path_factory.mktemp("transmute")
    make_chips(aquarium, root / "chips", ChipConfig(size=32, max_per_class=4), taxonomy=REPO / "configs/taxonomy/aquarium.csv",
               progress=False)
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=2, batch_size=4, warmup_steps=1,
                      checkpoint_every=10, log_every=1, device="cpu")
    train(cfg, root / "model", chips=root / "chips", progress=False)
    rows = read_jsonl(root / "chips" / "manifest.jsonl")
    fish = next(r for r in rows if r["label"] == "fish")
    return {"root": root, "model": root / "model", "chips": root / "chips", "image": root / "chips" / fish["file"]}


def _x0(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float().div(127.5).sub(1)[None]


def test_zero_strength_returns_the_input(world):
    model = load_model_folder(world["model"])
    sched = json.loads((world["model"] / "scheduler/scheduler_config.json").read_text())
    x0 = _x0(world["image"])
    codes = model.vocab.encode(json.loads((world["model"] / "taxon_counts.json").read_text())["Actinopterygii"]["lineage"])
    y = transmute_tensor(model, sched, x0, codes, codes, 0, TransmuteConfig(), 0)
    assert torch.equal(y, x0)


def test_inversion_round_trip_beats_forward_noising(world):
    """Inverting under A and denoising back under A (no guidance) reconstructs the chip far better
    than seeded forward noising does: inversion keeps the image's own layout in x_t."""
    model = load_model_folder(world["model"])
    sched = json.loads((world["model"] / "scheduler/scheduler_config.json").read_text())
    lin = json.loads((world["model"] / "taxon_counts.json").read_text())["Actinopterygii"]["lineage"]
    codes = model.vocab.encode(lin)
    x0 = _x0(world["image"])
    none = GuidanceConfig(mode="none")
    inv = transmute_tensor(model, sched, x0, codes, codes, 600, TransmuteConfig(method="inversion", steps=25, guidance=none), 0)
    fwd = transmute_tensor(model, sched, x0, codes, codes, 600, TransmuteConfig(method="noise", steps=25, guidance=none), 0)
    err_inv, err_fwd = (inv - x0).abs().mean().item(), (fwd - x0).abs().mean().item()
    assert err_inv < 0.5 * err_fwd, (err_inv, err_fwd)


def test_transmute_uses_branch_points_and_resumes(world):
    bp_file = branch_points(world["model"], world["chips"], n_per_taxon=4, grid=20, progress=False)
    bp = json.loads(bp_file.read_text())
    out = world["root"] / "out"
    cfg = TransmuteConfig(steps=10)
    rows = transmute(world["model"], world["image"], "puffin", out, from_taxon="fish", cfg=cfg, n=1)
    (row,) = rows
    pair = bp["pairs"].get("Actinopterygii|Fratercula") or bp["pairs"]["Fratercula|Actinopterygii"]
    assert row["t_source"] == "branch_points" and row["t_start"] == pair["t"]
    assert row["taxon"] == "Fratercula" and row["label"] == "puffin" and row["from_taxon"] == "Actinopterygii"
    assert row["lineage"]["family"] == "Alcidae" and row["sampler"] == "ddim-inversion"
    assert row["guidance"]["mode"] == "taxonomic" and len(row["model"]) == 16
    img = Image.open(out / row["file"])
    assert img.size == (32, 32)
    before = (out / row["file"]).read_bytes()
    # rerun: nothing redone; n=2 adds exactly one more row
    again = transmute(world["model"], world["image"], "puffin", out, from_taxon="fish", cfg=cfg, n=2)
    assert [r["index"] for r in again] == [0, 1]
    assert len(read_jsonl(out / "manifest.jsonl")) == 2 and (out / row["file"]).read_bytes() == before
    # without a source taxon there is no pair to look up: default strength, recorded as such
    (r2,) = transmute(world["model"], world["image"], "puffin", world["root"] / "out2", cfg=cfg)
    assert r2["t_source"] == "default_strength" and r2["t_start"] == round(0.5 * 999)


def test_errors_name_the_problem(world, tmp_path):
    with pytest.raises(SynthgenError, match="unknown to model|nothing trained"):
        transmute(world["model"], world["image"], "Balaenoptera", tmp_path / "o")
    with pytest.raises(SynthgenError, match="nope.png"):
        transmute(world["model"], tmp_path / "nope.png", "puffin", tmp_path / "o")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(SynthgenError, match="bad.png"):
        transmute(world["model"], bad, "puffin", tmp_path / "o")


def test_cli_branch_points_and_transmute(world, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["branch-points", "--model", str(world["model"]), "--chips", str(world["chips"]),
                              "--n-per-taxon", "4", "--grid", "10"])
    assert res.exit_code == 0, res.output
    assert "branch_points.json" in res.output and "phylum" in res.output
    res = runner.invoke(app, ["transmute", "--model", str(world["model"]), "--from-image", str(world["image"]),
                              "--to-taxon", "penguin", "--from-taxon", "fish", "--out", str(tmp_path / "o"),
                              "--steps", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (row,) = read_jsonl(tmp_path / "o" / "manifest.jsonl")
    assert row["taxon"] == "Spheniscidae" and row["t_source"] == "branch_points"
    res = runner.invoke(app, ["transmute", "--model", str(world["model"]), "--from-image", str(world["image"]),
                              "--to-taxon", "whale", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "error" in res.output and "Traceback" not in res.output

"""Branch points from forward-noised chips: hand-built extremes, real aquarium chips, storage, windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from detection.chips import ChipConfig, make_chips
from synthgen.branching import (
    BRANCH_FILE,
    branch_points,
    branch_time,
    compute_branch_points,
    divergence_level,
    guidance_window,
    load_branch_points,
    target_window,
)
from synthgen.errors import SynthgenError
from synthgen.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SCHED = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").config)


def synthetic_chips(out: Path, groups: dict[str, tuple[dict, callable]], n: int = 12, size: int = 16) -> Path:
    """Chips folder whose taxa are drawn by the given per-index image functions."""
    rows = []
    for taxon, (lineage, draw) in groups.items():
        for i in range(n):
            rel = f"train/{taxon}/{i}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw(i, size)).save(out / rel)
            rows.append({"file": rel, "label": taxon, "taxon": taxon, "lineage": lineage, "split": "train"})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def flat(rgb):
    def draw(i, s):
        rng = np.random.default_rng(i)
        base = np.array(rgb, dtype=float) + rng.normal(0, 10, 3)
        return np.clip(np.broadcast_to(base, (s, s, 3)), 0, 255).astype(np.uint8)

    return draw


def test_far_taxa_branch_late_and_same_distribution_branches_at_once(tmp_path):
    A = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves"}
    B = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Mammalia"}
    C = {"kingdom": "Animalia", "phylum": "Cnidaria"}
    chips = synthetic_chips(tmp_path / "c", {
        "red": (A, flat((220, 30, 30))),        # red vs blue: very different
        "blue": (C, flat((30, 30, 220))),
        "red2": (B, flat((220, 30, 30))),       # same distribution as red
    })
    bp = compute_branch_points(chips, SCHED, size=16, n_per_taxon=12, grid=40, progress=False)
    far = bp["pairs"]["blue|red"]
    same = bp["pairs"]["red|red2"]
    assert far["ratio_clean"] > 3 and same["ratio_clean"] < 1.1
    assert same["t"] == 0
    assert far["t"] > 500  # colour differences survive noise deep into the schedule
    assert far["level"] == "phylum" and same["level"] == "class"
    far2 = bp["pairs"]["blue|red2"]["t"]  # red2 vs blue also diverges at phylum
    assert bp["per_level"]["phylum"] == {"t": int(np.median([far["t"], far2])), "frac": pytest.approx(np.median([far["t"], far2]) / 1000), "pairs": 2}
    assert branch_time(bp, "red", "blue") == far["t"]
    # a pair never measured falls back to the median of its divergence level
    assert branch_time(bp, "x", "y", {"kingdom": "Animalia", "phylum": "P1"}, {"kingdom": "Animalia", "phylum": "P2"}) == bp["per_level"]["phylum"]["t"]
    start, end = guidance_window(bp, "phylum")
    assert end == 1.0 and start == pytest.approx(1 - bp["per_level"]["phylum"]["frac"], abs=1e-3)
    assert guidance_window(bp, "species") == (0.0, 1.0)


def test_divergence_level():
    lv = ["kingdom", "phylum", "class", "order"]
    assert divergence_level({"kingdom": "A", "phylum": "B", "class": "C"}, {"kingdom": "A", "phylum": "B", "class": "D"}, lv) == "class"
    assert divergence_level({"kingdom": "A", "phylum": "B"}, {"kingdom": "A", "phylum": "B", "order": "X"}, lv) == "order"


def test_branch_points_on_real_chips_stored_with_model(aquarium, tmp_path):
    make_chips(aquarium, tmp_path / "chips", ChipConfig(size=32, max_per_class=8), taxonomy=REPO / "configs/taxonomy/aquarium.csv",
               progress=False)
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=1, batch_size=2, warmup_steps=1,
                      checkpoint_every=10, log_every=1, device="cpu")
    train(cfg, tmp_path / "model", chips=tmp_path / "chips", progress=False)
    path = branch_points(tmp_path / "model", tmp_path / "chips", n_per_taxon=8, grid=20, progress=False)
    assert path == tmp_path / "model" / BRANCH_FILE
    bp = load_branch_points(tmp_path / "model")
    assert len(bp["taxa"]) == 7 and len(bp["pairs"]) == 21
    assert all(0 <= p["t"] <= 999 for p in bp["pairs"].values())
    assert set(bp["per_level"]) <= set(bp["levels"])
    assert bp["pairs"]["Actinopterygii|Asteroidea"]["level"] == "phylum"
    assert load_branch_points(tmp_path / "chips") is None
    with pytest.raises(SynthgenError, match="not a synthgen model folder"):
        branch_points(tmp_path / "chips", tmp_path / "chips")


def test_target_window_is_the_coarsest_measured_level_where_target_and_reference_part():
    bp = {"levels": ["kingdom", "phylum", "class", "family"],
          "per_level": {"phylum": {"t": 800, "frac": 0.8, "pairs": 3}, "family": {"t": 250, "frac": 0.25, "pairs": 1}}}
    assert guidance_window(bp, "phylum") == (0.2, 1.0) and guidance_window(bp, "family") == (0.75, 1.0)
    assert target_window(bp, ["family"]) == ((0.75, 1.0), "family")  # parent reference: the finest level only
    assert target_window(bp, ["phylum", "class", "family"]) == ((0.2, 1.0), "phylum")  # root: the first branch
    assert target_window(bp, ["class"]) is None  # no pair of taxa branches at class in the data


def test_too_few_taxa(tmp_path):
    chips = synthetic_chips(tmp_path / "c", {"red": ({"kingdom": "A"}, flat((200, 0, 0)))}, n=3)
    with pytest.raises(SynthgenError, match="at least two taxa"):
        compute_branch_points(chips, SCHED, size=16, progress=False)

"""Adding a taxon to a trained tiny model: vocab/table extension, delta storage, old taxa unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detection.chips import ChipConfig, make_chips, subset_chips
from synthgen.continual import ContinualConfig, add_taxa, batch_indices, old_taxa_report, tuned_names
from synthgen.errors import SynthgenError
from synthgen.models import TaxonVocab
from synthgen.models.delta import extend_vocab, load_model_folder
from synthgen.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TAXA_FILE = REPO / "configs/taxonomy/aquarium.csv"
NEW = "starfish"



@pytest.fixture(scope="module")
def world(aquarium, tmp_path_factory):
    """Real aquarium chips (7 taxa), a tiny base model trained without starfish."""
    root = tmp_path_factory.mktemp("continual")
    make_chips(aquarium, root / "all", ChipConfig(size=32, max_per_class=6), taxonomy=TAXA_FILE, progress=False)
    old = subset_chips(root / "all", root / "old", lambda lb: lb != NEW)
    new = subset_chips(root / "all", root / "new", lambda lb: lb == NEW)
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=4, batch_size=4, warmup_steps=1,
                      checkpoint_every=100, log_every=1, device="cpu", ema_decay=0.9)
    train(cfg, root / "base", chips=old, progress=False)
    return {"root": root, "all": root / "all", "old": old, "new": new, "base": root / "base"}


def tiny(tune: str, **kw) -> ContinualConfig:
    return ContinualConfig(**{**dict(tune=tune, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2,
                                     log_every=1, device="cpu"), **kw})


def test_extend_vocab_keeps_old_indices():
    old = TaxonVocab(levels=["kingdom", "phylum", "order"], names={"kingdom": ["Animalia"], "phylum": ["Chordata"],
                                                                   "order": ["Sphenisciformes"]})
    new = extend_vocab(old, [{"kingdom": "Animalia", "phylum": "Echinodermata", "class": "Asteroidea"},
                             {"kingdom": "Animalia", "phylum": "Arthropoda"}])
    assert new.levels == ["kingdom", "phylum", "class", "order"]  # new level slotted in rank order
    assert new.names["phylum"] == ["Chordata", "Arthropoda", "Echinodermata"]  # old first, new appended
    assert new.encode({"kingdom": "Animalia", "phylum": "Chordata", "order": "Sphenisciformes"}) == (1, 1, 0, 1)
    assert new.encode({"kingdom": "Animalia", "phylum": "Echinodermata", "class": "Asteroidea"}) == (1, 3, 1, 0)


def test_replay_batches_hold_the_new_share():
    """Replay must not swamp a rare new taxon: a fixed share of every batch is new-taxon chips."""
    is_new = torch.tensor([True] * 3 + [False] * 97)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = batch_indices(is_new, 32, 0.5, g)
        assert len(idx) == 32 and int(is_new[idx].sum()) == 16
    only_new = torch.ones(5, dtype=torch.bool)
    assert len(batch_indices(only_new, 8, 0.5, g)) == 8  # nothing replayed: the whole batch is new
    assert int(is_new[batch_indices(is_new, 8, 0.01, g)].sum()) == 1  # at least one new chip per batch


def test_rows_only_keeps_old_taxa_bit_identical(world):
    out = world["root"] / "ext-rows"
    res = add_taxa(world["base"], world["new"], out, TAXA_FILE, tiny("rows"), progress=False)
    assert res.new_taxa == ["Asteroidea"]
    base, ext = load_model_folder(world["base"]), load_model_folder(out)
    # every weight of the base is in the extension unchanged; only new rows were added
    bsd, esd = base.state_dict(), ext.state_dict()
    for k, v in bsd.items():
        if k.startswith("encoder.tables."):
            lv = base.vocab.levels[int(k.split(".")[2])]
            w = esd[f"encoder.tables.{ext.vocab.levels.index(lv)}.weight"]
            assert torch.equal(w[: v.shape[0]], v)
        else:
            assert torch.equal(esd[k], v), k
    phylum = ext.vocab.levels.index("phylum")
    assert ext.encoder.tables[phylum].weight.shape[0] == base.encoder.tables[base.vocab.levels.index("phylum")].weight.shape[0] + 1
    assert ext.encoder.tables[phylum].weight[-1].abs().sum() > 0  # the new Echinodermata row learned
    # the delta holds only new rows: a few KB against the full model
    delta = load_file(str(out / "delta.safetensors"))
    assert all(k.startswith("rows.") for k in delta)
    assert res.delta_bytes < res.base_bytes / 100
    # same seeds -> identical old-taxa samples, hence identical judge accuracy
    rep = old_taxa_report(world["base"], out, world["all"], n=2, steps=3)
    assert all(v["identical"] for v in rep["per_taxon"].values())
    assert rep["acc_before"] == rep["acc_after"] and rep["mean_abs_pixel_diff"] == 0.0
    # the extended folder generates the new taxon through the ordinary code path
    counts = json.loads((out / "taxon_counts.json").read_text())
    assert counts["Asteroidea"]["count"] == 6 and counts["Asteroidea"]["label"] == "starfish"
    assert len(counts) == 7


def test_rows_bias_norm_delta_and_drift_measured(world):
    out = world["root"] / "ext-rbn"
    res = add_taxa(world["base"], world["all"], out, TAXA_FILE, tiny("rows+bias+norm"), progress=False)
    meta = json.loads((out / "continual.json").read_text())
    ext = load_model_folder(out)
    names = meta["tuned_tensors"]
    assert names and all(n.endswith(".bias") or "norm" in n for n in names)
    assert set(names) == set(tuned_names(ext, "rows+bias+norm"))
    assert not any(n.endswith(".weight") and "norm" not in n for n in names)  # kernels stay frozen
    assert res.delta_bytes < res.base_bytes / 5
    rep = old_taxa_report(world["base"], out, world["all"], n=2, steps=3)
    assert 0.0 <= rep["acc_after"] <= 1.0 and rep["mean_abs_pixel_diff"] >= 0.0
    assert set(rep["per_taxon"]) == set(json.loads((world["base"] / "taxon_counts.json").read_text()))


def test_resume_after_kill_matches_uninterrupted(world, monkeypatch):
    import synthgen.continual as continual

    a, b = world["root"] / "res-a", world["root"] / "res-b"
    add_taxa(world["base"], world["new"], a, TAXA_FILE, tiny("rows+bias"), progress=False)
    real_gen = continual.seeded_generator

    def killed(*key):
        if key[1] == 3:  # step 3 of 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_gen(*key)

    monkeypatch.setattr(continual, "seeded_generator", killed)
    with pytest.raises(KeyboardInterrupt):
        add_taxa(world["base"], world["new"], b, TAXA_FILE, tiny("rows+bias"), progress=False)
    assert (b / "checkpoints/last/state.json").exists() and not (b / "synthgen_model.json").exists()
    monkeypatch.setattr(continual, "seeded_generator", real_gen)
    add_taxa(world["base"], world["new"], b, TAXA_FILE, tiny("rows+bias"), progress=False)
    da, db = load_file(str(a / "delta.safetensors")), load_file(str(b / "delta.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    assert not (b / "checkpoints").exists()
    # rerunning a finished extension is a no-op; a different config into the same folder is refused
    again = add_taxa(world["base"], world["new"], a, TAXA_FILE, tiny("rows+bias"), progress=False)
    assert again.seconds == 0.0
    with pytest.raises(SynthgenError, match="different model, data or settings"):
        add_taxa(world["base"], world["new"], a, TAXA_FILE, tiny("rows"), progress=False)


def test_bad_inputs_name_the_file(world, tmp_path):
    with pytest.raises(SynthgenError, match="nothing to add"):
        add_taxa(world["base"], world["old"], tmp_path / "x", TAXA_FILE, tiny("rows"), progress=False)
    seals_tax = REPO / "configs/taxonomy/glacierbay-seals.csv"
    with pytest.raises(SynthgenError, match="glacierbay-seals.csv"):
        add_taxa(world["base"], world["new"], tmp_path / "y", seals_tax, tiny("rows"), progress=False)
    with pytest.raises(SynthgenError, match="must differ"):
        add_taxa(world["base"], world["new"], world["base"], TAXA_FILE, tiny("rows"), progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tune: everything\n")
    with pytest.raises(SynthgenError, match="bad.yaml"):
        ContinualConfig.from_yaml(bad)
    for f in (REPO / "configs/continual").glob("*.yaml"):
        ContinualConfig.from_yaml(f)


def test_extended_folder_generates_through_the_pipeline(world):
    from synthgen.pipelines import GenerateConfig, generate

    out = world["root"] / "ext-gen"
    add_taxa(world["base"], world["new"], out, TAXA_FILE, tiny("rows", steps=2), progress=False)
    res = generate(out, "starfish", 2, world["root"] / "pool", GenerateConfig(steps=3, device="cpu"), progress=False)
    rows = [json.loads(x) for x in (world["root"] / "pool/manifest.jsonl").read_text().splitlines()]
    assert res.written == 2 and {r["taxon"] for r in rows} == {"Asteroidea"}
    assert rows[0]["model"] == json.loads((out / "synthgen_model.json").read_text())["id"]


def test_cli_train_add_taxa(world, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    cfg = tmp_path / "continual" / "rows.yaml"
    cfg.parent.mkdir()
    cfg.write_text("tune: rows\nsteps: 2\nbatch_size: 2\nwarmup_steps: 1\n")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--from", str(world["base"]), "--add-taxa", str(TAXA_FILE), "--data",
                              str(world["new"]), "--config", str(cfg), "--out", str(tmp_path / "ext"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Asteroidea" in res.output and "KB" in res.output
    assert json.loads((tmp_path / "ext" / "continual.json").read_text())["tune"] == "rows"
    res = runner.invoke(app, ["train", "--add-taxa", str(TAXA_FILE), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "--from" in res.output

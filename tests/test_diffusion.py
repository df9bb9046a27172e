"""Tiny-scale tests of the taxonomy-conditioned diffusion model and its progressive trainer."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthgen.errors import SynthgenError
from synthgen.guidance import reference_codes
from synthgen.models import ConditionedUNet, TaxonVocab
from synthgen.train import TrainConfig, drop_conditions, load_chips, plan_stages, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**kw) -> TrainConfig:
    base = dict(preset="tiny", image_size=32, steps_per_stage=2, batch_size=4, warmup_steps=1, checkpoint_every=3,
                log_every=1, device="cpu", ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def chips(aquarium_chips, tmp_path_factory) -> Path:
    return aquarium_chips(tmp_path_factory.mktemp("chips"))


def test_vocab_and_encoder_roundtrip(chips):
    data = load_chips(chips, 32)
    vocab = TaxonVocab.from_lineages(data.lineages)
    assert vocab.levels[:3] == ["kingdom", "phylum", "class"]
    assert "genus" in vocab.levels and vocab.levels.index("order") < vocab.levels.index("genus")
    puffin = next(lin for lin, lb in zip(data.lineages, data.labels, strict=True) if lb == "puffin")
    codes = vocab.encode(puffin)
    assert all(c > 0 for c in codes) and vocab.decode(codes) == puffin
    fish = next(lin for lin, lb in zip(data.lineages, data.labels, strict=True) if lb == "fish")
    assert vocab.encode(fish)[vocab.levels.index("order")] == 0  # fish labelled at class: none below

    model = ConditionedUNet.create("tiny", 32, vocab)
    x = torch.randn(2, 3, 32, 32)
    codes_t = torch.tensor([vocab.encode(puffin), vocab.encode(fish)])
    eps = model(x, torch.tensor([10, 500]), codes_t)
    assert eps.shape == x.shape
    # the taxon really changes the prediction (the encoder's vector reaches the UNet)
    with torch.no_grad():
        for t in model.encoder.tables:
            t.weight.normal_()
        a = model(x[:1], torch.tensor([10]), codes_t[:1])
        b = model(x[:1], torch.tensor([10]), codes_t[1:])
    assert not torch.allclose(a, b)


def test_condition_dropout_reaches_every_depth():
    codes = torch.tensor([[1, 2, 3, 4]] * 4000)
    g = torch.Generator().manual_seed(0)
    out = drop_conditions(codes, max_level=2, p_uncond=0.1, p_drop=0.5, g=g)
    assert (out[:, 3] == 0).all()  # finer than the stage's level: always none
    depth = (out != 0).sum(1)
    frac_uncond = (depth == 0).float().mean().item()
    # all-none = p_uncond + (1-p_uncond)*p_drop/3 (cut at the first of 3 defined levels)
    assert abs(frac_uncond - (0.1 + 0.9 * 0.5 / 3)) < 0.03
    for d in (1, 2, 3):
        assert (depth == d).any()
    kept = out[depth > 0]
    assert ((kept == 0) | (kept == codes[: len(kept)])).all()  # dropping never changes a kept code
    # prefix property: a dropped level implies every finer level dropped
    nz = out != 0
    assert (nz[:, 1:] <= nz[:, :-1]).all()


def test_reference_codes():
    levels = ["kingdom", "phylum", "class", "order"]
    assert reference_codes((1, 2, 3, 0), "taxonomic", "parent", levels) == (1, 2, 0, 0)
    assert reference_codes((1, 2, 3, 4), "taxonomic", "root", levels) == (1, 0, 0, 0)
    assert reference_codes((1, 2, 3, 4), "taxonomic", "phylum", levels) == (1, 2, 0, 0)
    assert reference_codes((1, 2, 3, 4), "cfg", "parent", levels) == (0, 0, 0, 0)
    with pytest.raises(SynthgenError, match="unknown guidance reference"):
        reference_codes((1, 2, 3, 4), "taxonomic", "tribe", levels)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_target_inverts_to_noise_and_image(prediction_type):
    """The training target and the sampler's (noise, x0) recovery are exact inverses at every noise level,
    including a -> 0 where v keeps x0 recoverable and epsilon does not."""
    from synthgen.models.prediction import eps_and_x0, training_target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    a = torch.tensor([0.999, 0.5, 0.1, 1e-3, 1e-9], dtype=torch.float64).view(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps, x0_hat = eps_and_x0(training_target(x0, noise, a, prediction_type), xt, a, prediction_type)
    assert torch.allclose(eps, noise, atol=1e-6)
    assert torch.allclose(x0_hat, x0, atol=1e-4 if prediction_type == "epsilon" else 1e-9)
    if prediction_type == "v_prediction":  # at zero SNR the output alone carries x0: -v = x0
        assert torch.allclose(-training_target(x0, noise, a, prediction_type)[-1], x0[-1], atol=1e-4)


def test_plan_stages_progressive_and_flat(chips):
    data = load_chips(chips, 32)
    vocab = TaxonVocab.from_lineages(data.lineages)
    cfg = tiny_config()
    stages = plan_stages(cfg, vocab, data.lineages)
    names = [vocab.levels[s.max_level] for s in stages]
    # kingdom/phylum are constant (all Animalia/Chordata): they join the class stage
    assert names[0] == "class" and names[-1] == vocab.levels[-1]
    assert stages[0].new_levels == [0, 1, 2]
    assert all(s.train == ["unet", "mlp", "new"] for s in stages)
    flat = plan_stages(tiny_config(mode="flat"), vocab, data.lineages)
    assert len(flat) == 1 and flat[0].max_level == len(vocab.levels) - 1 and flat[0].train == ["all"]


def test_progressive_training_trains_every_table_and_saves(chips, tmp_path):
    """Every stage's table moves from its init and the folder is complete (that earlier tables then
    stay fixed is test_frozen_tables_stay_fixed)."""
    cfg = tiny_config(ema_decay=0.0)  # EMA = raw weights, so the saved tables show what trained
    res = train(cfg, tmp_path / "m", chips=chips, progress=False)
    out = res.out
    data = load_chips(chips, 32)
    vocab = TaxonVocab.from_lineages(data.lineages)
    stages = plan_stages(cfg, vocab, data.lineages)
    assert res.steps == 2 * len(stages) >= 3
    for name in ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "taxonomy_encoder.safetensors",
                 "taxonomy_encoder.json", "train_config.yaml", "taxon_counts.json", "model_card.md", "loss.png",
                 "losses.csv", "scheduler/scheduler_config.json", "synthgen_model.json", "model_index.json"]:
        assert (out / name).exists(), name
    counts = json.loads((out / "taxon_counts.json").read_text())
    assert {c["label"] for c in counts.values()} == {"fish", "penguin", "puffin", "stingray"}
    assert sum(c["count"] for c in counts.values()) == len(data.taxa)
    losses = list(csv.DictReader(open(out / "losses.csv")))
    assert len(losses) == res.steps and {int(r["stage"]) for r in losses} == set(range(len(stages)))
    # the class table (stage 1) and the last stage's table both moved from their init
    model = ConditionedUNet.load(out)
    torch.manual_seed(cfg.seed)
    init = ConditionedUNet.create("tiny", 32, vocab)
    ck = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in ck] == [f"step-{s:07d}" for s in (res.steps - 2, res.steps)]
    cls = vocab.levels.index("class")
    assert not torch.allclose(model.encoder.tables[cls].weight, init.encoder.tables[cls].weight)
    last = vocab.levels.index(vocab.levels[stages[-1].max_level])
    assert not torch.allclose(model.encoder.tables[last].weight, init.encoder.tables[last].weight)
    assert json.loads((out / "model_index.json").read_text())["kind"] == "pixel"


def test_frozen_tables_stay_fixed(chips, tmp_path):
    cfg = tiny_config(ema_decay=0.0, checkpoint_every=1, keep_checkpoints=100)
    train(cfg, tmp_path / "m", chips=chips, progress=False)
    cls_key = "encoder.tables.2.weight"  # class level
    cks = sorted((tmp_path / "m" / "checkpoints").glob("step-*"))
    after_stage1 = load_file(str(cks[1] / "model.safetensors"))[cls_key]
    final = load_file(str(cks[-1] / "model.safetensors"))[cls_key]
    assert torch.equal(after_stage1, final)
    unet_key = "unet.conv_in.weight"
    assert not torch.equal(load_file(str(cks[1] / "model.safetensors"))[unet_key],
                           load_file(str(cks[-1] / "model.safetensors"))[unet_key])


def test_resume_equals_uninterrupted(chips, tmp_path):
    """Resuming from a mid-stage checkpoint gives bit-identical weights to one straight run."""
    cfg = tiny_config(ema_decay=0.5, checkpoint_every=3, keep_checkpoints=100)
    full = train(cfg, tmp_path / "full", chips=chips, progress=False)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000003", part / "checkpoints" / "step-0000003")
    res = train(cfg, part, chips=chips, progress=False)
    assert res.steps == full.steps
    for f in ["unet/diffusion_pytorch_model.safetensors", "taxonomy_encoder.safetensors"]:
        a, b = load_file(str(full.out / f)), load_file(str(part / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert (part / "losses.csv").read_text() == (full.out / "losses.csv").read_text()


def test_resume_from_stage_end_starts_next_stage_fresh(chips, tmp_path):
    """A kill right after a stage's last checkpoint: the resumed run starts the next stage with a new
    optimizer, as the straight run does, and ends bit-identical to it."""
    cfg = tiny_config(ema_decay=0.5, checkpoint_every=1, keep_checkpoints=100)
    full = train(cfg, tmp_path / "full", chips=chips, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full.out / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    train(cfg, part, chips=chips, progress=False)
    a = load_file(str(full.out / "unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(part / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_trains_longer(chips, tmp_path):
    """Raising the step count of a finished run continues it from its last checkpoint; the stages
    before that checkpoint must keep their lengths, else a clear error."""
    flat = tiny_config(mode="flat", steps_per_stage=2, keep_checkpoints=100)
    train(flat, tmp_path / "m", chips=chips, progress=False)
    before = list(csv.DictReader(open(tmp_path / "m" / "losses.csv")))
    res = train(tiny_config(mode="flat", steps_per_stage=5), tmp_path / "m", chips=chips, progress=False)
    after = list(csv.DictReader(open(tmp_path / "m" / "losses.csv")))
    assert res.steps == 5 and json.loads((tmp_path / "m" / "synthgen_model.json").read_text())["steps"] == 5
    assert [int(r["step"]) for r in after] == [1, 2, 3, 4, 5] and after[:2] == before

    prog = tiny_config(keep_checkpoints=100)
    done = train(prog, tmp_path / "p", chips=chips, progress=False)
    n = done.steps // 2
    with pytest.raises(SynthgenError, match="lengthen only the checkpoint's stage"):
        train(tiny_config(steps_per_stage=3), tmp_path / "p", chips=chips, progress=False)
    longer_last = [{}] * (n - 1) + [{"steps": 4}]
    res = train(tiny_config(stages=longer_last), tmp_path / "p", chips=chips, progress=False)
    assert res.steps == done.steps + 2


def test_resume_refuses_other_model(chips, tmp_path):
    train(tiny_config(steps_per_stage=1, checkpoint_every=1), tmp_path / "m", chips=chips, progress=False)
    (tmp_path / "m" / "synthgen_model.json").unlink()
    with pytest.raises(SynthgenError, match="different model"):
        train(tiny_config(steps_per_stage=1, mlp=False), tmp_path / "m", chips=chips, progress=False)


def test_bad_chips_manifest_names_line(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "taxon": "x"}\n{oops\n{"file": "b.png"}\n')
    with pytest.raises(SynthgenError, match=r"manifest.jsonl:2: not valid JSON"):
        load_chips(tmp_path, 32)
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "taxon": "x"}\n')
    with pytest.raises(SynthgenError, match=r"manifest.jsonl:1: cannot read image .*a.png"):
        load_chips(tmp_path, 32)


def test_train_config_yaml_errors(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("preset: tiny\np_drop: 3\n")
    with pytest.raises(SynthgenError, match="t.yaml"):
        TrainConfig.from_yaml(p)
    for f in sorted((REPO / "configs" / "train").glob("*.yaml")):
        TrainConfig.from_yaml(f)


@pytest.mark.slow
def test_cli_train_killed_then_resumed(chips, tmp_path):
    """Kill `synthgen train` mid-run (SIGKILL), rerun the same command: it finishes from the last
    checkpoint with the final step count and loadable checkpoints."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text("preset: tiny\nimage_size: 32\nsteps_per_stage: 30\nbatch_size: 4\ncheckpoint_every: 5\n"
                   "log_every: 1\ndevice: cpu\nthreads: 1\nmode: flat\n")
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "cli", "train", "--config", str(cfg), "--chips", str(chips), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-0000010")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "synthgen_model.json").exists(), "killed too late: training already finished"
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout
    meta = json.loads((out / "synthgen_model.json").read_text())
    assert meta["steps"] == 30
    cks = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in cks] == ["step-0000025", "step-0000030"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    for ck in cks:
        load_file(str(ck / "model.safetensors"))
    assert len(list(csv.DictReader(open(out / "losses.csv")))) == 30

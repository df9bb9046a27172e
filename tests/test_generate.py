"""Tiny-scale tests of `synthgen generate`: guidance, seeds, taxon resolution, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.guidance import GuidanceConfig
from synthgen.io_utils import read_jsonl
from synthgen.pipelines import GenerateConfig, GuidedSampler, generate, load_model, resolve_targets
from synthgen.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_diffusion import make_chips  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(aquarium, tmp_path_factory) -> Path:
    """A tiny model trained a few flat steps on real aquarium chips; its taxon tables are then
    randomised so that different taxa give clearly different predictions."""
    from synthgen.models import ConditionedUNet

    tmp = tmp_path_factory.mktemp("gen")
    chips = make_chips(aquarium, tmp / "chips")
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=2, batch_size=4, warmup_steps=1,
                      device="cpu")
    out = train(cfg, tmp / "model", chips=chips, progress=False).out
    m = ConditionedUNet.load(out)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in m.encoder.tables:
            t.weight.normal_(std=3.0)
    m.save(out)
    return out


def _cfg(**kw) -> GenerateConfig:
    return GenerateConfig(**{"steps": 4, "batch_size": 4, "device": "cpu", **kw})


def _pixels(folder: Path) -> dict[int, np.ndarray]:
    return {r["index"]: np.asarray(Image.open(folder / r["file"])).astype(int) for r in read_jsonl(folder / "manifest.jsonl")}


def test_generate_writes_pool_manifest_and_grid(model_dir, tmp_path):
    res = generate(model_dir, "penguin", 3, tmp_path, _cfg(grid=True), progress=False)
    assert res.written == 3
    rows = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    r = rows[0]
    assert r["taxon"] == "Spheniscidae" and r["label"] == "penguin" and r["lineage"]["order"] == "Sphenisciformes"
    assert r["sampler"] == "ddim" and r["steps"] == 4 and r["guidance"]["mode"] == "taxonomic"
    assert r["model"] == json.loads((model_dir / "synthgen_model.json").read_text())["id"]
    im = Image.open(tmp_path / r["file"])
    assert im.size == (32, 32) and im.mode == "RGB"
    assert res.grids == [tmp_path / "grids" / "Spheniscidae.png"] and res.grids[0].exists()
    again = generate(model_dir, "penguin", 3, tmp_path, _cfg(), progress=False)
    assert again.written == 0 and again.already == 3


def test_guidance_modes_differ(model_dir):
    model, sched = load_model(model_dir, torch.device("cpu"))
    vocab = model.vocab
    puffin = vocab.encode({"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Charadriiformes",
                           "family": "Alcidae", "genus": "Fratercula"})
    from synthgen.guidance import reference_codes

    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    codes = torch.tensor([puffin, puffin])
    outs = {}
    for mode, ref in [("none", "parent"), ("cfg", "parent"), ("taxonomic", "parent"), ("taxonomic", "root")]:
        g = GuidanceConfig(mode=mode, scale=3.0, reference=ref)
        refs = torch.tensor([reference_codes(puffin, mode, ref, vocab.levels)] * 2)
        for sampler in ("ddim", "dpm", "euler"):
            outs[(mode, ref, sampler)] = GuidedSampler(model, sched, sampler, 4)(noise, codes, refs, g).int()
    for sampler in ("ddim", "dpm", "euler"):
        imgs = [v for k, v in outs.items() if k[2] == sampler]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                assert (imgs[i] - imgs[j]).abs().float().mean() > 0.5, (sampler, i, j)
    # a window that excludes every step is the same as no guidance
    g = GuidanceConfig(mode="cfg", scale=3.0, window=(1.0, 1.0))
    refs = torch.zeros_like(codes)
    off = GuidedSampler(model, sched, "ddim", 4)(noise, codes, refs, g).int()
    assert torch.equal(off, outs[("none", "parent", "ddim")])


def test_fast_ddim_matches_diffusers_step(model_dir):
    """The pre-computed DDIM update equals diffusers' DDIMScheduler.step on the same model."""
    from synthgen.guidance import combine
    from synthgen.pipelines import make_scheduler

    model, sched_cfg = load_model(model_dir, torch.device("cpu"))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    codes = torch.tensor([[1] * len(model.vocab.levels)] * 2)
    codes[:, 3:] = 0
    refs = torch.zeros_like(codes)
    ours = GuidedSampler(model, sched_cfg, "ddim", 5)(noise, codes, refs, GuidanceConfig(mode="cfg", scale=2.0))
    s = make_scheduler("ddim", sched_cfg)
    s.set_timesteps(5)
    x = noise.clone()
    with torch.no_grad():
        for t in s.timesteps:
            out = model(torch.cat([x, x]), t, torch.cat([codes, refs]))
            x = s.step(combine(out[:2], out[2:], 2.0), t, x).prev_sample
    stock = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (ours.int() - stock.int()).abs().max() <= 1


def test_each_image_reproducible_alone(model_dir, tmp_path):
    generate(model_dir, "Aves", 5, tmp_path / "a", _cfg(batch_size=5, seed=7), progress=False)
    generate(model_dir, "Aves", 5, tmp_path / "b", _cfg(batch_size=1, seed=7), progress=False)
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert a.keys() == b.keys() == set(range(5))
    for i in a:
        assert np.abs(a[i] - b[i]).max() <= 1  # batch size changes nothing (up to float rounding)
    ra, rb = read_jsonl(tmp_path / "a" / "manifest.jsonl"), read_jsonl(tmp_path / "b" / "manifest.jsonl")
    assert [r["seed"] for r in ra] == [r["seed"] for r in rb]
    assert len({r["seed"] for r in ra}) == 5
    generate(model_dir, "Aves", 5, tmp_path / "c", _cfg(batch_size=5, seed=8), progress=False)
    c = _pixels(tmp_path / "c")
    assert all(np.abs(a[i] - c[i]).mean() > 1 for i in a)  # another base seed, other images


def test_taxon_above_leaves_and_errors(model_dir, tmp_path):
    aves = resolve_targets(model_dir, "Aves")
    assert {t.taxon for t in aves} == {"Spheniscidae", "Fratercula"}
    assert sorted(t.weight for t in aves) == [6.0, 6.0]  # training counts
    assert [t.weight for t in resolve_targets(model_dir, "Aves", even=True)] == [1.0, 1.0]
    assert [t.taxon for t in resolve_targets(model_dir, "puffins")] == ["Fratercula"]  # common name
    assert {t.taxon for t in resolve_targets(model_dir, "Chordata")} == {"Actinopterygii", "Spheniscidae", "Fratercula",
                                                                          "Myliobatiformes"}
    assert [t.taxon for t in resolve_targets(model_dir, "puffin")] == ["Fratercula"]
    assert [t.taxon for t in resolve_targets(model_dir, "Charadriiformes")] == ["Fratercula"]
    res = generate(model_dir, "Aves", 12, tmp_path, _cfg(batch_size=12, steps=2), progress=False)
    assert res.written == 12
    assert {r["taxon"] for r in read_jsonl(tmp_path / "manifest.jsonl")} == {"Spheniscidae", "Fratercula"}
    # shark (Selachimorpha) is in the taxonomy but was not trained: the error names stingray's taxon,
    # the trained taxon closest to it (same class Chondrichthyes)
    with pytest.raises(SynthgenError, match="nothing trained under 'shark'.*Myliobatiformes") as e:
        resolve_targets(model_dir, "shark")
    assert "Fratercula" not in str(e.value)
    with pytest.raises(SynthgenError, match="unknown to model.*trained taxa"):
        resolve_targets(model_dir, "Megaptera")


def test_generate_refuses_mixed_settings(model_dir, tmp_path):
    generate(model_dir, "fish", 2, tmp_path, _cfg(), progress=False)
    with pytest.raises(SynthgenError, match="other settings"):
        generate(model_dir, "fish", 4, tmp_path, _cfg(sampler="euler"), progress=False)
    generate(model_dir, "stingray", 2, tmp_path, _cfg(sampler="euler"), progress=False)  # another taxon is fine
    assert len(read_jsonl(tmp_path / "manifest.jsonl")) == 4


@pytest.mark.slow
def test_cli_generate_killed_then_resumed(model_dir, tmp_path):
    """SIGKILL `synthgen generate` mid-run, rerun: n distinct indices, n readable files, no temp files."""
    out = tmp_path / "pool"
    n = 40
    cmd = [sys.executable, "-m", "cli", "generate", "--model", str(model_dir), "--taxon", "Aves", "--n", str(n),
           "--out", str(out), "--steps", "3", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(out / "manifest.jsonl")) < 6:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_jsonl(out / "manifest.jsonl"))
    assert 6 <= killed_at < n, "the kill must land mid-run"
    r = subprocess.run(cmd + ["--grid"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(n))
    files = sorted(p for p in (out / "Aves").iterdir())
    assert len(files) == n and all(not p.name.startswith(".") for p in files)
    for p in files:
        with Image.open(p) as im:
            im.load()
    assert (out / "grids").is_dir()

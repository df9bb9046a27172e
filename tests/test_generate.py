"""Tiny-scale tests of `synthgen generate`: guidance, seeds, taxon resolution, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.guidance import GuidanceConfig
from synthgen.io_utils import read_jsonl
from synthgen.pipelines import GenerateConfig, GuidedSampler, generate, load_model, resolve_targets
from synthgen.pipelines.generate import Target, allot
from synthgen.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(aquarium_chips, tmp_path_factory) -> Path:
    """A tiny model trained a few flat steps on real aquarium chips; its taxon tables are then
    randomised so that different taxa give clearly different predictions."""
    from synthgen.models import ConditionedUNet

    tmp = tmp_path_factory.mktemp("gen")
    chips = aquarium_chips(tmp / "chips")
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


@pytest.mark.parametrize("prediction", [("v_prediction", "trailing"), ("epsilon", "leading")])
def test_fast_ddim_matches_diffusers_step(model_dir, prediction):
    """The pre-computed DDIM update equals diffusers' DDIMScheduler.step on the same model, for
    v-prediction (the default for new models) and for epsilon models trained before it."""
    from synthgen.guidance import combine
    from synthgen.schedulers import make_scheduler

    model, sched_cfg = load_model(model_dir, torch.device("cpu"))
    assert (sched_cfg["prediction_type"], sched_cfg["timestep_spacing"]) == ("v_prediction", "trailing")
    sched_cfg = {**sched_cfg, "prediction_type": prediction[0], "timestep_spacing": prediction[1]}
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
    assert Counter(r["taxon"] for r in read_jsonl(tmp_path / "manifest.jsonl")) == {"Spheniscidae": 6,
                                                                                     "Fratercula": 6}
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


def _previous_ddim(model, sched_cfg, noise, codes, refs, steps, scale):
    """The guided DDIM loop as it was before the feature cache (reference for bit-identity)."""
    from synthgen.guidance import combine
    from synthgen.models.prediction import eps_and_x0
    from synthgen.schedulers import make_scheduler

    s = make_scheduler("ddim", sched_cfg)
    s.set_timesteps(steps)
    b = noise.shape[0]
    x = (noise * s.init_noise_sigma).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        emb = model.encoder(torch.cat([codes, refs]))
        ac = s.alphas_cumprod
        prev = s.timesteps - s.config.num_train_timesteps // steps
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], s.final_alpha_cumprod)
        for t, a, p in zip(s.timesteps, ac[s.timesteps], a_prev, strict=True):
            out = model.unet(torch.cat([x, x]), t, class_labels=emb).sample.float()
            eps, x0 = eps_and_x0(combine(out[:b], out[b:], scale), x, a, sched_cfg["prediction_type"])
            x = p.sqrt() * x0.clamp(-1, 1) + (1 - p).sqrt() * eps
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def test_cache_interval_one_is_the_previous_sampler_and_cache_stays_close(model_dir):
    model, sched_cfg = load_model(model_dir, torch.device("cpu"))
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    codes = torch.tensor([[1] * len(model.vocab.levels)] * 3)
    refs = torch.zeros_like(codes)
    g = GuidanceConfig(mode="cfg", scale=2.0)
    exact = GuidedSampler(model, sched_cfg, "ddim", 6, cache_interval=1)(noise, codes, refs, g)
    assert torch.equal(exact, _previous_ddim(model, sched_cfg, noise, codes, refs, 6, 2.0))
    cached = GuidedSampler(model, sched_cfg, "ddim", 6, cache_interval=3)(noise, codes, refs, g).int()
    other = GuidedSampler(model, sched_cfg, "ddim", 6)(torch.randn_like(noise), codes, refs, g).int()
    gap = (cached - exact.int()).abs().float().mean()
    assert 0 < gap < 0.5 * (other - exact.int()).abs().float().mean()  # an approximation, far closer than a new seed
    # the guidance window closes on step 3, not a refresh step: the cache is rebuilt for the target-only batch
    w = GuidanceConfig(mode="cfg", scale=2.0, window=(0.0, 0.5))
    for sampler in ("ddim", "dpm", "euler"):
        out = GuidedSampler(model, sched_cfg, sampler, 5, cache_interval=4)(noise, codes, refs, w)
        assert out.shape == (3, 32, 32, 3) and out.dtype == torch.uint8


@pytest.mark.parametrize("preset,kw", [
    ("tiny", {}),
    ("small", {}),
    ("tiny", {"down_block_types": ("AttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
              "attention_head_dim": 16}),
])
def test_shallow_forward_on_fresh_cache_is_the_full_forward(preset, kw):
    from synthgen.models import build_unet
    from synthgen.pipelines.sampling import cache_support, deep_forward, shallow_forward

    torch.manual_seed(0)
    unet = build_unet(preset, 32, **kw).eval()
    assert cache_support(unet) is None
    x = torch.randn(4, 3, 32, 32)
    emb = torch.randn(4, unet.config.block_out_channels[0] * 4)
    t = torch.tensor(421)
    with torch.inference_mode():
        full = unet(x, t, class_labels=emb).sample
        hooked, deep = deep_forward(unet, x, t, emb)
        shallow = shallow_forward(unet, x, t, emb, deep)
        stale = shallow_forward(unet, x, torch.tensor(401), emb, deep)
    assert torch.equal(hooked, full)
    assert torch.allclose(shallow, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, full, atol=1e-3)  # the shallow path does depend on its own timestep


def test_cache_interval_validation(model_dir):
    from synthgen.models import ConditionedUNet, build_unet

    model, sched_cfg = load_model(model_dir, torch.device("cpu"))
    with pytest.raises(SynthgenError, match="cache_interval must be >= 1"):
        GuidedSampler(model, sched_cfg, "ddim", 4, cache_interval=0)
    flat = build_unet("tiny", 32, block_out_channels=(32,), down_block_types=("DownBlock2D",),
                      up_block_types=("UpBlock2D",))
    single = ConditionedUNet(flat, model.encoder, model.vocab)
    with pytest.raises(SynthgenError, match="single resolution"):
        GuidedSampler(single, sched_cfg, "ddim", 4, cache_interval=2)
    GuidedSampler(single, sched_cfg, "ddim", 4, cache_interval=1)  # exact sampling needs no cache support


def test_generate_with_cache_writes_manifest_and_keeps_settings_apart(model_dir, tmp_path):
    res = generate(model_dir, "penguin", 3, tmp_path, _cfg(cache_interval=2), progress=False)
    assert res.written == 3
    rows = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2] and all(r["cache_interval"] == 2 for r in rows)
    for r in rows:
        with Image.open(tmp_path / r["file"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert generate(model_dir, "penguin", 3, tmp_path, _cfg(cache_interval=2), progress=False).already == 3
    with pytest.raises(SynthgenError, match="cache interval 2"):
        generate(model_dir, "penguin", 4, tmp_path, _cfg(), progress=False)  # exact rows must not mix in
    generate(model_dir, "fish", 1, tmp_path, _cfg(), progress=False)
    assert "cache_interval" not in read_jsonl(tmp_path / "manifest.jsonl")[-1]  # exact rows look as before
    with pytest.raises(SynthgenError, match="cache interval 1"):
        generate(model_dir, "fish", 2, tmp_path, _cfg(cache_interval=3), progress=False)


def test_windows_from_branch_points(model_dir, tmp_path):
    """Each row's window comes from the model's branch_points.json at the level where its taxon parts
    from its reference; without the file (or at an unmeasured level) a warning and the configured window."""
    import shutil
    import warnings

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    configured = GuidanceConfig(window=(0.0, 0.5))
    with pytest.warns(UserWarning, match="no branch_points.json"):
        generate(model, "Aves", 3, tmp_path / "a", _cfg(window_from_branch_points=True, guidance=configured),
                 progress=False)
    rows = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    assert len(rows) == 3 and all(r["guidance_window"] == [0.0, 0.5] for r in rows)
    assert not any("branch_level" in r or "branch_points" in r for r in rows)

    bp = {"levels": ["kingdom", "phylum", "class", "order", "family", "genus"], "pairs": {},
          "per_level": {"phylum": {"t": 800, "frac": 0.8, "pairs": 3}, "family": {"t": 250, "frac": 0.25, "pairs": 1}}}
    (model / "branch_points.json").write_text(json.dumps(bp))
    # parent reference: a penguin parts from its order at family (measured), a puffin at genus (not)
    with pytest.warns(UserWarning, match="Fratercula"):
        generate(model, "Aves", 8, tmp_path / "b", _cfg(window_from_branch_points=True, guidance=configured),
                 progress=False)
    rows = read_jsonl(tmp_path / "b" / "manifest.jsonl")
    got = {(r["taxon"], tuple(r["guidance_window"]), r["branch_level"]) for r in rows}
    assert got == {("Spheniscidae", (0.75, 1.0), "family"), ("Fratercula", (0.0, 0.5), None)}
    assert len({r["branch_points"] for r in rows}) == 1
    # root reference: both part from Animalia first at phylum
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, "Aves", 4, tmp_path / "c",
                 _cfg(window_from_branch_points=True, guidance=GuidanceConfig(reference="root")), progress=False)
    rows = read_jsonl(tmp_path / "c" / "manifest.jsonl")
    assert all(r["guidance_window"] == [0.2, 1.0] and r["branch_level"] == "phylum" for r in rows)

    # the images are those of that window given by hand, not of the configured one
    generate(model, "penguin", 3, tmp_path / "d", _cfg(window_from_branch_points=True), progress=False)
    generate(model, "penguin", 3, tmp_path / "e", _cfg(guidance=GuidanceConfig(window=(0.75, 1.0))), progress=False)
    generate(model, "penguin", 3, tmp_path / "f", _cfg(), progress=False)
    d, e, f = (_pixels(tmp_path / x) for x in "def")
    assert all(np.array_equal(d[i], e[i]) for i in range(3))
    assert any(np.abs(d[i] - f[i]).mean() > 0.5 for i in range(3))
    # a recomputed branch_points.json must not mix into the pool
    bp["per_level"]["family"] = {"t": 500, "frac": 0.5, "pairs": 1}
    (model / "branch_points.json").write_text(json.dumps(bp))
    with pytest.raises(SynthgenError, match="branch points"):
        generate(model, "penguin", 4, tmp_path / "d", _cfg(window_from_branch_points=True), progress=False)


def test_cli_generate_cache_interval_and_branch_windows(model_dir, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from cli import app

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    bp = {"levels": ["kingdom", "phylum", "class", "order", "family", "genus"], "pairs": {},
          "per_level": {"family": {"t": 250, "frac": 0.25, "pairs": 1}}}
    (model / "branch_points.json").write_text(json.dumps(bp))
    args = ["generate", "--model", str(model), "--taxon", "penguin", "--n", "2", "--out", str(tmp_path / "pool"),
            "--steps", "4", "--batch-size", "2", "--device", "cpu", "--cache-interval", "2", "--window-from-branch-points"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "pool" / "manifest.jsonl")
    assert len(rows) == 2
    assert all(r["cache_interval"] == 2 and r["guidance_window"] == [0.75, 1.0] and r["branch_level"] == "family"
               for r in rows)
    res = CliRunner().invoke(app, args[:-3] + ["--cache-interval", "0"])
    assert res.exit_code == 1 and "--cache-interval: " in res.output  # the flag named, in one line


def test_allot_keeps_every_prefix_in_proportion():
    """`--even` over 7 taxa and n=28 gives 4 of each (a random draw gave 2 to 8); counts-weighted
    runs hold the training proportions in every prefix, and image i's taxon does not depend on n."""
    even = [Target(str(k), str(k), {}, 1.0) for k in range(7)]
    assert set(Counter(t.taxon for t in allot(even, 28)).values()) == {4}
    weighted = [Target("a", "a", {}, 100.0), Target("b", "b", {}, 10.0), Target("c", "c", {}, 1.0)]
    plan = allot(weighted, 222)
    for n in range(1, 223):
        got = Counter(t.taxon for t in plan[:n])
        assert all(abs(got[t.taxon] - n * t.weight / 111) < 1 for t in weighted)
    assert allot(weighted, 50) == plan[:50]


def test_generator_index_save_and_upgrade(model_dir, tmp_path):
    """One folder format: the index names the kind, save_pretrained round-trips the weights, a folder
    from before the index gets one line pointing at `synthgen upgrade-model`, which fixes it; bad
    arguments are refused in one line."""
    from typer.testing import CliRunner

    from cli import app
    from synthgen.generator import load_generator
    from synthgen.pixel import PixelGenerator

    index = json.loads((model_dir / "model_index.json").read_text())
    assert (index["kind"], index["_class_name"], index["format_version"]) == ("pixel", "PixelGenerator", 1)
    gen = load_generator(model_dir, device="cpu")
    assert isinstance(gen, PixelGenerator)
    copy = tmp_path / "copy"
    gen.save_pretrained(copy)
    a, b = gen.load()[0].state_dict(), load_generator(copy, device="cpu").load()[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (copy / "model_index.json").unlink()
    with pytest.raises(SynthgenError, match=f"synthgen upgrade-model {copy}"):
        load_generator(copy)
    r = CliRunner().invoke(app, ["upgrade-model", str(copy)])
    assert r.exit_code == 0 and "'pixel'" in r.output
    assert isinstance(load_generator(copy), PixelGenerator)
    pool = tmp_path / "pool"
    for flags, said in [(["--n", "-3"], "at least 1"), (["--n", "2", "--guidance", "bogus"], "--guidance: mode:"),
                        (["--n", "2", "--window", "0.8,0.2"], "--guidance: window:")]:
        r = CliRunner().invoke(app, ["generate", "--model", str(copy), "--taxon", "fish", "--out", str(pool), *flags])
        assert r.exit_code == 1 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not pool.exists()

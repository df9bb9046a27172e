"""Latent (Stable Diffusion + LoRA) backend on CPU with tiny random SD components and real chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from synthgen.errors import SynthgenError
from synthgen.generator import load_generator, load_train_config
from synthgen.io_utils import read_jsonl
from synthgen.latent import (
    LatentGenerateConfig,
    LatentTrainConfig,
    ModelLoadError,
    generate_latent,
    load_sd,
    train_latent,
)
from synthgen.latent import train as latent_train
from synthgen.latent.config import CutConfig
from synthgen.latent.cutout import cut_instance
from synthgen.latent.generator import LatentGenerator
from synthgen.latent.loading import enable_memory_savers
from synthgen.latent.tiny import build_tiny_sd
from synthgen.latent.train import load_trained
from synthgen.train import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread beats two on a shared 2-core runner (no oversubscription spin)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def chips(aquarium: Path, configs: Path, tmp_path_factory) -> Path:
    """A real chips folder (`synthgen data chips`): 3 aquarium train instances per label + taxonomy.json."""
    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips

    out = tmp_path_factory.mktemp("chips") / "chips"
    ds = read_dataset(aquarium, splits=["train"])
    make_chips(ds, out, ChipConfig(size=32, max_per_class=3), taxonomy=configs / "taxonomy" / "aquarium.csv",
               split="train")
    return out


def _train_cfg(tiny_sd: Path, **kw) -> LatentTrainConfig:
    base = {"base_model": str(tiny_sd), "resolution": 32, "batch_size": 2, "levels": ["phylum", "class"],
            "steps_per_stage": [1, 1], "lora": {"rank": 4, "alpha": 4}, "conditioner": {"hidden": 16},
            "lr": 1e-2, "device": "cpu"}
    base.update(kw)
    return LatentTrainConfig.model_validate(base)


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, chips: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "latent"
    train_latent(_train_cfg(tiny_sd), chips, out, progress=False)
    return out


def test_progressive_training_one_step_per_stage(trained: Path, tiny_sd: Path, chips: Path, tmp_path: Path):
    for name in ("lora.safetensors", "conditioner.safetensors", "train_config.yaml",
                 "model_card.md", "loss.png", "taxon_counts.json", "latent_model.json"):
        assert (trained / name).is_file(), name
    assert not (trained / "checkpoint").exists()
    log = read_jsonl(trained / "loss.jsonl")
    assert [(r["step"], r["stage"]) for r in log] == [(1, 1), (2, 2)]
    assert all(np.isfinite(r["loss"]) for r in log)
    meta = json.loads((trained / "latent_model.json").read_text())
    assert meta["levels"] == ["phylum", "class"] and meta["family"] == "sd"
    assert yaml.safe_load((trained / "train_config.yaml").read_text())["backend"] == "latent"
    counts = json.loads((trained / "taxon_counts.json").read_text())
    assert len(counts) == 7 and all(v["count"] == 3 for v in counts.values())
    assert counts["Selachimorpha"]["label"] == "shark"
    assert (trained / "taxonomy.json").read_text() == (chips / "taxonomy.json").read_text()

    cond = load_file(trained / "conditioner.safetensors")
    lora = load_file(trained / "lora.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero: it learned
    assert cond["ranks.0.fc2.weight"].abs().sum() > 0 and cond["ranks.1.fc2.weight"].abs().sum() > 0

    # stage 1 alone trains only the top rank's module: the class module stays at its zero init
    only1 = tmp_path / "stage1"
    train_latent(_train_cfg(tiny_sd, steps_per_stage=[1, 0]), chips, only1, progress=False)
    c1 = load_file(only1 / "conditioner.safetensors")
    assert c1["ranks.0.fc2.weight"].abs().sum() > 0
    assert c1["ranks.1.fc2.weight"].abs().sum() == 0


def test_lora_safetensors_roundtrip(trained: Path, tiny_sd: Path):
    saved = load_file(trained / "lora.safetensors")
    sd = load_sd(str(tiny_sd))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    before = sd.unet(x, 10, encoder_hidden_states=ctx).sample
    meta, conditioner = load_trained(trained, sd, torch.device("cpu"))
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(sd.unet)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert conditioner is not None and conditioner.levels == ["phylum", "class"]
    after = sd.unet(x, 10, encoder_hidden_states=ctx).sample
    assert not torch.allclose(before, after)


def test_generate_manifest_and_resume(trained: Path, tmp_path: Path):
    assert isinstance(load_generator(trained), LatentGenerator)
    with pytest.raises(SynthgenError, match="no model_index.json"):
        load_generator(tmp_path)
    out = tmp_path / "pool"
    cfg = LatentGenerateConfig(steps=2, sampler="ddim", batch_size=2, device="cpu",
                               guidance={"mode": "taxonomic", "scale": 3.0, "cfg_scale": 2.0})
    r1 = generate_latent(trained, "shark", 2, out, cfg, progress=False)
    assert (r1.written, r1.already) == (2, 0)
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == 2
    for r in rows:
        for key in ("file", "label", "taxon", "lineage", "seed", "sampler", "steps", "guidance", "model"):
            assert key in r, key
        assert r["label"] == "shark" and r["taxon"] == "Selachimorpha" and r["guidance"]["mode"] == "taxonomic"
        assert Image.open(out / r["file"]).size[0] <= 32 and (out / r["full_image"]).is_file()
    first = (out / rows[0]["file"]).read_bytes()
    r2 = generate_latent(trained, "shark", 3, out, cfg, progress=False)
    assert (r2.written, r2.already) == (1, 2)
    rows = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    assert (out / rows[0]["file"]).read_bytes() == first  # done images are not redone
    with pytest.raises(SynthgenError, match="other settings"):
        generate_latent(trained, "shark", 3, out, cfg.model_copy(update={"steps": 3}), progress=False)
    with pytest.raises(SynthgenError, match="unknown"):
        generate_latent(trained, "Megaptera", 1, tmp_path / "x", cfg, progress=False)


def test_generate_same_seed_same_image(trained: Path, tmp_path: Path):
    cfg = LatentGenerateConfig(steps=2, sampler="dpm++", batch_size=1, device="cpu", cut={"enabled": False})
    a = generate_latent(trained, "Chordata", 1, tmp_path / "a", cfg, progress=False)
    b = generate_latent(trained, "Chordata", 1, tmp_path / "b", cfg, progress=False)
    ra, rb = read_jsonl(a.out / "manifest.jsonl")[0], read_jsonl(b.out / "manifest.jsonl")[0]
    assert ra["seed"] == rb["seed"] and ra["taxon"] == rb["taxon"]
    assert np.array_equal(np.asarray(Image.open(a.out / ra["file"])), np.asarray(Image.open(b.out / rb["file"])))


def test_training_resumes_after_kill(tiny_sd: Path, chips: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "resume"
    cfg = _train_cfg(tiny_sd, steps_per_stage=[2, 2], checkpoint_every=1)
    real = latent_train._checkpoint

    def killed_after_step_3(ckpt_dir, sd, conditioner, opt, step, stage, seconds, key):
        real(ckpt_dir, sd, conditioner, opt, step, stage, seconds, key)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(latent_train, "_checkpoint", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_latent(cfg, chips, out, progress=False)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (out / "latent_model.json").exists()
    monkeypatch.setattr(latent_train, "_checkpoint", real)
    with pytest.raises(SynthgenError, match="different model, data or settings"):
        train_latent(cfg.model_copy(update={"lr": 1e-3}), chips, out, progress=False)
    res = train_latent(cfg, chips, out, progress=False)
    assert res.steps == 4
    assert [r["step"] for r in read_jsonl(out / "loss.jsonl")] == [1, 2, 3, 4]
    assert not (out / "checkpoint").exists()


def test_dreambooth_lora_step_and_generation(seals: Path, tiny_sd: Path, tmp_path: Path):
    """A handful of real seal crops in a plain folder, one prompt (no manifest needed)."""
    data = tmp_path / "seal_images"
    data.mkdir()
    for k, img in enumerate(sorted((seals / "train" / "images").glob("*.jpg"))[:3]):
        with Image.open(img) as im:
            im.convert("RGB").resize((48, 48)).save(data / f"seal_{k}.png")
    cfg = LatentTrainConfig.model_validate({
        "method": "dreambooth", "base_model": str(tiny_sd), "resolution": 32, "batch_size": 2, "steps_per_stage": 1,
        "device": "cpu", "lora": {"rank": 4, "alpha": 4},
        "dreambooth": {"prompt": "a drone photo of a harbor seal on ice", "taxon": "Phoca vitulina", "label": "seal",
                       "class_prompt": "a photo of a seal", "num_class_images": 2, "class_steps": 1}})
    model = tmp_path / "db"
    res = train_latent(cfg, data, model, progress=False)
    assert res.steps == 1 and np.isfinite(res.final_loss)
    assert not (model / "conditioner.safetensors").exists()
    assert sorted(p.name for p in (model / "class_images").iterdir()) == ["class_00000.png", "class_00001.png"]
    assert "harbor seal" in (model / "model_card.md").read_text()
    gen = generate_latent(model, "seal", 1, tmp_path / "pool",
                          LatentGenerateConfig(steps=2, batch_size=1, device="cpu"), progress=False)
    row = read_jsonl(gen.out / "manifest.jsonl")[0]
    assert row["taxon"] == "Phoca vitulina" and row["label"] == "seal"
    assert row["prompt"] == "a drone photo of a harbor seal on ice"
    with pytest.raises(SynthgenError, match="taxonomic guidance"):
        generate_latent(model, "seal", 1, tmp_path / "p2", LatentGenerateConfig(guidance={"mode": "taxonomic"}))
    assert len(list(data.iterdir())) == 3  # the user's input folder is untouched


def test_dreambooth_on_one_taxon_of_a_chips_folder(chips: Path, tiny_sd: Path, tmp_path: Path):
    cfg = LatentTrainConfig.model_validate({
        "method": "dreambooth", "base_model": str(tiny_sd), "resolution": 32, "batch_size": 2, "steps_per_stage": 1,
        "device": "cpu", "dreambooth": {"prompt": "a photo of a penguin underwater", "taxon": "penguin"}})
    train_latent(cfg, chips, tmp_path / "db", progress=False)
    counts = json.loads((tmp_path / "db" / "taxon_counts.json").read_text())
    assert list(counts) == ["Spheniscidae"] and counts["Spheniscidae"]["count"] == 3
    with pytest.raises(SynthgenError, match="no rows"):
        train_latent(cfg.model_copy(update={"dreambooth": cfg.dreambooth.model_copy(update={"taxon": "Megaptera"})}),
                     chips, tmp_path / "db2", progress=False)


def test_sdxl_family_train_and_generate(chips: Path, tmp_path: Path):
    sdxl = build_tiny_sd(tmp_path / "tiny-sdxl", family="sdxl")
    out = tmp_path / "xl"
    train_latent(_train_cfg(sdxl, levels=["class"], steps_per_stage=1, gradient_checkpointing=True), chips, out,
                 progress=False)
    assert json.loads((out / "latent_model.json").read_text())["family"] == "sdxl"
    gen = generate_latent(out, "fish", 1, tmp_path / "pool",
                          LatentGenerateConfig(steps=1, batch_size=1, device="cpu"), progress=False)
    assert gen.written == 1


def test_offline_and_bad_model_errors(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="huggingface-cli download") as e:
        load_sd("synthgen-test/no-such-model", local_files_only=True)
    assert "synthgen-test/no-such-model" in str(e.value) and "base_model" in str(e.value)
    with pytest.raises(ModelLoadError, match="not found"):
        load_sd(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_sd(str(tmp_path / "empty"))


def test_xformers_missing_is_a_clear_error(tiny_sd: Path):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers installed: the memory-efficient path is available")
    except ImportError:
        pass
    with pytest.raises(SynthgenError, match="xformers"):
        enable_memory_savers(load_sd(str(tiny_sd)).unet, gradient_checkpointing=False, xformers=True)


def test_cut_instance_finds_the_animal():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(200, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:64, :64]
    blob = ((yy - 30) ** 2 / 12**2 + (xx - 36) ** 2 / 8**2) <= 1
    img[blob] = (60, 40, 30)
    cut = cut_instance(Image.fromarray(img), CutConfig(context=0.15))
    assert cut.ok and cut.chip.mode == "RGBA"
    x0, y0, x1, y1 = cut.box
    assert abs(x0 - 28) <= 2 and abs(x1 - 45) <= 2 and abs(y0 - 18) <= 2 and abs(y1 - 43) <= 2
    # square chip with 15% context per side around the instance (the `data chips` geometry)
    assert cut.chip.size[0] == cut.chip.size[1] == round((y1 - y0) * 1.3)
    cx0, cy0, _, _ = cut.chip_box
    assert cx0 <= x0 and cy0 <= y0
    alpha = np.asarray(cut.chip)[..., 3]
    assert abs((alpha > 0).sum() - blob.sum()) < 0.15 * blob.sum()
    flat = cut_instance(Image.new("RGB", (32, 32), (128, 128, 128)), CutConfig())
    assert not flat.ok and flat.box == (0, 0, 32, 32)


def test_configs_and_errors(configs: Path, tmp_path: Path, chips: Path):
    files = sorted((configs / "latent").glob("*.yaml"))
    assert {f.name for f in files} >= {"generate-512.yaml", "sd15-taxonomy.yaml"}
    for f in files:  # every shipped config loads, with the values it writes
        cls = LatentGenerateConfig if "generate" in f.name else LatentTrainConfig
        cfg = cls.from_yaml(f)
        assert all(getattr(cfg, k) == v for k, v in yaml.safe_load(f.read_text()).items() if not isinstance(v, dict))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n")
    with pytest.raises(SynthgenError, match="bad.yaml"):
        LatentTrainConfig.from_yaml(bad)
    assert isinstance(load_train_config(configs / "latent" / "sd15-taxonomy.yaml"), LatentTrainConfig)
    bad.write_text("preset: tiny\n")
    assert isinstance(load_train_config(bad), TrainConfig)  # no backend field: the pixel default
    with pytest.raises(SynthgenError, match="--chips"):
        train_latent(LatentTrainConfig(), None, tmp_path / "m")
    with pytest.raises(SynthgenError, match="inside the training data"):
        train_latent(LatentTrainConfig(), chips, chips / "model")


def test_guidance_arithmetic_and_reference_levels():
    from synthgen.guidance import combine, reference_depth
    from synthgen.latent.config import LatentGuidanceConfig

    c, u, r = torch.full((1,), 3.0), torch.full((1,), 1.0), torch.full((1,), 2.0)
    assert combine(c, u, 2.0).item() == 1 + 2 * (3 - 1)  # cfg: the reference is the unconditional
    tax = LatentGuidanceConfig(mode="taxonomic", scale=4.0, cfg_scale=1.5)
    assert combine(c, r, tax.scale, u, tax.cfg_scale).item() == 1 + 1.5 * (2 - 1) + 4 * (3 - 2)
    assert not LatentGuidanceConfig(mode="none").active(0, 10)  # no guidance: the plain conditional
    assert not tax.model_copy(update={"window": (0.5, 1.0)}).active(0, 10)  # outside the window
    assert (LatentGuidanceConfig().mode, LatentGuidanceConfig().scale, LatentGuidanceConfig().cfg_scale) == ("cfg", 7.5, 5.0)
    levels = ["kingdom", "phylum", "class", "order", "family"]
    penguin = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "family": "Spheniscidae"}
    assert reference_depth(penguin, levels, "parent") == 3  # up to class (order is absent)
    assert reference_depth(penguin, levels, "root") == 1
    assert reference_depth(penguin, levels, "phylum") == 2
    with pytest.raises(SynthgenError, match="unknown guidance reference 'genus'"):
        reference_depth(penguin, levels, "genus")

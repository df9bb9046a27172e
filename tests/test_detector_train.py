"""train-detector: ratio sampler (unit + inside a real ultralytics loader), offline training, resume marker."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.train import DetectorTrainConfig, RatioSampler, _prepare_data, train_detector, write_data_yaml
from synthgen.errors import SynthgenError


def test_ratio_sampler_exact_share_per_batch_and_epoch_length():
    flags = [False] * 20 + [True] * 200  # 10x more synthetic files than real
    s = RatioSampler(flags, ratio=0.25, batch_size=8, seed=3)
    idx = list(s)
    assert len(idx) == len(s) == 27  # ceil(20 / 0.75): one pass over the real images
    batches = [idx[i : i + 8] for i in range(0, len(idx), 8)]
    for b in batches[:-1]:
        assert sum(i >= 20 for i in b) == 2  # 0.25 * 8 exactly, whatever the file counts
    real = [i for i in idx if i < 20]
    assert len(set(real)) == len(real)  # real images not repeated before the pool is used up
    assert list(RatioSampler(flags, 0.25, 8, seed=3)) == idx  # deterministic by seed
    assert list(s) != idx  # the next epoch reshuffles even without set_epoch (single process)
    s.set_epoch(0)
    assert list(s) == idx  # DDP: set_epoch pins the order on every rank


def test_ratio_sampler_fractional_share_and_ddp_shards():
    flags = [False] * 100 + [True] * 100
    s = RatioSampler(flags, ratio=0.3, batch_size=4, seed=0)
    idx = list(s)
    assert abs(np.mean([i >= 100 for i in idx]) - 0.3) < 0.06  # 1.2 per batch of 4, rounded stochastically
    shards = [list(RatioSampler(flags, 0.5, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 100
    real0 = {i for i in shards[0] if i < 100}
    real1 = {i for i in shards[1] if i < 100}
    assert not real0 & real1  # ranks see disjoint real images within an epoch
    with pytest.raises(SynthgenError, match="no synthetic images"):
        RatioSampler([False] * 4, 0.5, 2)


@pytest.fixture(scope="module")
def tiny_lists(aquarium: Path, tmp_path_factory) -> dict[str, Path]:
    """Image lists over the real aquarium files (never copied); 'synthetic' here is a disjoint
    set of real images standing in for composed tiles: what matters is list membership."""
    d = tmp_path_factory.mktemp("lists")
    imgs = sorted((aquarium / "train" / "images").glob("*.jpg"))
    val = sorted((aquarium / "valid" / "images").glob("*.jpg"))[:2]
    out = {}
    for name, files in {"real": imgs[:4], "synth": imgs[4:16], "val": val}.items():
        out[name] = d / f"{name}.txt"
        out[name].write_text("\n".join(map(str, files)) + "\n")
    names = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
    out["data"] = write_data_yaml(d / "data.yaml", names, out["real"], out["val"], out["synth"], 0.5)
    return out


@pytest.mark.slow
def test_train_detector_offline_with_ratio(tiny_lists, tmp_path, monkeypatch, aquarium):
    attempts = []

    def deny(*a, **k):
        attempts.append(a)
        raise OSError("network denied in test")

    monkeypatch.setattr(socket, "getaddrinfo", deny)
    monkeypatch.setattr(socket.socket, "connect", deny)
    before = sorted(p.name for p in (aquarium / "train").iterdir())

    cfg = DetectorTrainConfig(
        model="yolov8n.yaml", data=str(tiny_lists["data"]), imgsz=64, epochs=1, batch=4, workers=0,
        device="cpu", overrides={"val": True},
    )
    out = tmp_path / "run"
    best = train_detector(cfg, out, verbose=False)
    assert best.is_file() and best.with_suffix(".safetensors").is_file()
    assert (out / "done.json").is_file()
    assert attempts == []  # no font / weight / AMP / DNS call was even tried
    assert sorted(p.name for p in (aquarium / "train").iterdir()) == before  # no labels.cache written

    # the derived data.yaml carries the ratio; the real trainer's loader uses the sampler
    from detection.train import RatioDetectionTrainer, make_ultralytics_offline

    make_ultralytics_offline()
    synth = set(tiny_lists["synth"].read_text().split())

    def epoch_counts(data: Path, name: str) -> Counter:
        trainer = RatioDetectionTrainer(
            overrides=dict(model="yolov8n.yaml", data=str(data), imgsz=64, batch=4, workers=0, device="cpu",
                           project=str(tmp_path), name=name, plots=False, amp=False, verbose=False)
        )
        trainer._setup_train()
        assert isinstance(trainer.train_loader.sampler, RatioSampler)
        counts = Counter()
        for batch in trainer.train_loader:
            counts.update("synth" if f in synth else "real" for f in batch["im_file"])
        return counts

    counts = epoch_counts(out / "data.yaml", "probe")
    assert counts["synth"] == counts["real"] == 4  # 4 real / (1 - 0.5) = 8 images, half synthetic
    # match_real: the epoch is as long as real-only training's (equal optimizer steps), still half synthetic
    matched = DetectorTrainConfig(**(cfg.model_dump() | {"synthetic_epoch": "match_real"}))
    counts = epoch_counts(Path(_prepare_data(matched, tmp_path)), "probe2")
    assert counts["synth"] == counts["real"] == 2

    # our own checkpoints load through the restricted unpickler (weights_only, layers allow-listed)
    from detection.infer import load_model
    from detection.train import load_torch_checkpoint

    assert load_model(best, torch.device("cpu")).names[0] == "fish"
    assert "optimizer" in load_torch_checkpoint(out / "weights" / "last.pt")

    # finished runs are skipped (no retraining): the marker short-circuits
    mtime = best.stat().st_mtime
    assert train_detector(cfg, out, verbose=False) == best and best.stat().st_mtime == mtime
    with pytest.raises(SynthgenError, match="different config"):  # never silently reuse another schedule
        train_detector(cfg.model_copy(update={"epochs": 2}), out, verbose=False)


def test_missing_weights_message_is_actionable(tmp_path):
    with pytest.raises(ValueError, match="local .pt path or a model yaml"):
        DetectorTrainConfig(model=str(tmp_path / "nope.pt"))


def test_train_detector_from_a_crafted_pt_is_refused_without_running_code(tiny_lists, tmp_path):
    """A .pt that would run `touch MARKER` when unpickled (issue 20): one line, nothing run."""
    from typer.testing import CliRunner

    from cli import app

    marker = tmp_path / "marker"

    class RunsShell:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    pt = tmp_path / "weights.pt"
    torch.save({"model": RunsShell(), "train_args": {}}, pt)
    r = CliRunner().invoke(app, ["train-detector", "--data", str(tiny_lists["data"]), "--model", str(pt),
                                 "--out", str(tmp_path / "run"), "--epochs", "1", "--imgsz", "64", "--batch", "2",
                                 "--device", "cpu"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    err = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "weights.pt" in err[0] and "--trust-checkpoint" in err[0], r.stdout

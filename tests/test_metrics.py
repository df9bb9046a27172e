"""Sample-quality metrics: hand-worked values, then `evaluate-samples` end to end on real chips."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LINEAGE, tiny_chips, tiny_judge, tiny_open_clip
from PIL import Image
from typer.testing import CliRunner

from synthgen.errors import SynthgenError
from synthgen.metrics import (
    evaluate_samples,
    frechet_distance,
    kid,
    load_lpips,
    lpips_distance,
    mean_pairwise_distance,
    mean_pairwise_lpips,
    nearest_distance,
    precision_recall,
)
from synthgen.scoring import JudgeScorer, Pool


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    """Features are cached per file content under $SYNTHGEN_CACHE: keep each test's cache to itself."""
    monkeypatch.setenv("SYNTHGEN_CACHE", str(tmp_path / "cache"))


def test_frechet_by_hand():
    a = np.array([[0.0], [2.0]])  # mean 1, var 2 (ddof 1)
    b = np.array([[1.0], [3.0]])  # mean 2, var 2
    assert frechet_distance(a, b) == pytest.approx(1.0)  # (1-2)^2 + 2 + 2 - 2*sqrt(4)
    c = np.array([[0.0], [4.0]])  # var 8: (1-2)^2 + 2 + 8 - 2*4 = 3
    assert frechet_distance(a, c + 0.0) == pytest.approx(1 + 2 + 8 - 8)
    x = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert np.isnan(frechet_distance(x[:1], x))


def test_kid_by_hand():
    x = np.array([[1.0], [0.0]])
    y = np.array([[0.0], [0.0]])
    # k(u,v) = (uv + 1)^3: kxx off-diagonal = 1, kyy off-diagonal = 1, kxy all = 1 -> 1 + 1 - 2 = 0
    assert kid(x, y, subsets=1)[0] == pytest.approx(0.0)
    x2 = np.array([[1.0], [1.0]])  # kxx off = 8, kyy off = 1, kxy = 1 -> 8 + 1 - 2 = 7
    assert kid(x2, y, subsets=1)[0] == pytest.approx(7.0)
    rng = np.random.default_rng(1)
    same = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), subsets=10, subset_size=100)[0]
    shifted = kid(rng.normal(size=(300, 8)), rng.normal(1.0, size=(300, 8)), subsets=10, subset_size=100)[0]
    assert abs(same) < 0.05 < shifted


def test_precision_recall_by_hand():
    real = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [2, 2]])
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # half the fakes sit on real points, half far away: precision 0.5; all fakes' k-NN balls around the
    # near half reach every real point except none of the far ones are needed
    half = np.concatenate([real[:3], far[:3]])
    p, _ = precision_recall(real, half, k=3)
    assert p == 0.5


def test_diversity_and_nearest_by_hand():
    eye = np.eye(3)
    assert mean_pairwise_distance(eye) == pytest.approx(1.0)  # orthogonal: cosine distance 1
    assert mean_pairwise_distance(np.array([[0.0, 0], [3, 4]]), cosine=False) == pytest.approx(5.0)
    assert np.isnan(mean_pairwise_distance(eye[:1]))
    d = nearest_distance(np.array([[1.0, 0], [1, 1]]), np.array([[2.0, 0], [0, 1]]))
    np.testing.assert_allclose(d, [0, 1 - np.cos(np.pi / 4)], atol=1e-7)


def _lpips_file(path: Path) -> Path:
    """What a user saves on a machine with internet, but with a random AlexNet backbone (no download)
    and the package's own linear heads; saved with save_model as the loader's error message says."""
    import lpips
    from safetensors.torch import save_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        save_model(lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False), str(path))
    return path


def _noise(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_lpips_from_local_file_offline(tmp_path, no_network):
    from safetensors.torch import load_file

    path = _lpips_file(tmp_path / "alex.safetensors")
    model = load_lpips(path)
    assert model.pnet_type == "alex"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in load_file(path).items())  # backbone too: from the file
    a, b, c = _noise(1), _noise(2), _noise(3, (64, 30))  # c: other size and aspect, resized to 64 x 64
    d = lpips_distance(model, [a, a, b, a], [a, b, a, c])
    assert d[0] == pytest.approx(0, abs=1e-6) and d[1] > 1e-4 and d[3] > 1e-4
    assert d[1] == pytest.approx(d[2], rel=1e-5)  # symmetric
    # the same weights as a .pth (lin0 and its lins.0 alias both present) give the same distances
    torch.save(model.state_dict(), tmp_path / "alex.pth")
    np.testing.assert_allclose(lpips_distance(load_lpips(tmp_path / "alex.pth"), [a, b], [b, a]), d[[1, 2]],
                               rtol=1e-5)
    assert mean_pairwise_lpips(model, [a] * 5) == (pytest.approx(0, abs=1e-6), 10)  # all 10 pairs, all identical
    imgs = [_noise(s) for s in range(30)]
    files = []
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    v, n = mean_pairwise_lpips(model, imgs, max_pairs=12, seed=3)
    assert n == 12 and v > 1e-4  # capped: 435 pairs exist
    assert mean_pairwise_lpips(model, files, max_pairs=12, seed=3) == (pytest.approx(v, rel=1e-5), 12)
    assert mean_pairwise_lpips(model, imgs[:1]) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_lpips_bad_files_name_the_file_and_the_fix(tmp_path):
    import lpips

    with pytest.raises(SynthgenError, match=r"nope\.safetensors: LPIPS weights file not found.*save_model"):
        load_lpips(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(SynthgenError, match=r"junk\.safetensors: cannot read LPIPS weights.*save_model"):
        load_lpips(tmp_path / "junk.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(SynthgenError, match=r"w\.bin: LPIPS weights must be \.safetensors or \.pth"):
        load_lpips(tmp_path / "w.bin")
    # the package's bundled file holds only the linear heads: the backbone keys are missing
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    with pytest.raises(SynthgenError, match=r"alex\.pth: keys do not match LPIPS net 'alex' \(missing \['net\."):
        load_lpips(heads)
    full = _lpips_file(tmp_path / "alex.safetensors")
    with pytest.raises(SynthgenError, match=r"alex\.safetensors: holds LPIPS net 'alex', not the requested 'vgg'"):
        load_lpips(full, net="vgg")


def _pool_from(tmp: Path, split: str, relabel: dict[str, str] | None = None) -> Path:
    """A generated-style pool made of real chips of `split` (optionally claimed as other labels)."""
    chips = Pool.load(tiny_chips(), split=split)
    rows = []
    for r in chips.rows:
        claimed = (relabel or {}).get(r["label"], r["label"])
        f = f"{claimed}/{Path(r['file']).name}"
        (tmp / claimed).mkdir(parents=True, exist_ok=True)
        shutil.copy(chips.path(r), tmp / f)
        taxon, lin = LINEAGE[claimed]
        rows.append({"file": f, "label": claimed, "taxon": taxon, "lineage": lin, "seed": len(rows)})
    (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def test_evaluate_samples_floor_memorisation_and_accuracy(tmp_path):
    judge_dir, _ = tiny_judge()
    scorer = JudgeScorer(judge_dir, device="cpu")
    # "generated" = copies of the training chips: memorised, so nearest-train distance is 0
    copies = evaluate_samples(_pool_from(tmp_path / "copies", "train"), tiny_chips(), scorer, tmp_path / "r1")
    o = copies["overall"]
    assert o["nn_train_median"]["generated"] == pytest.approx(0, abs=1e-5)
    assert o["nn_train_median"]["real"] > 0.001 and o["memorised_share"] == 1.0
    # the floor is train vs held-out at the generated sample size; copies of train match it exactly
    assert o["fd"]["generated"] == pytest.approx(frechet_distance(
        scorer.embed_images(list(Pool.load(tiny_chips(), split="train").images())),
        scorer.embed_images(list(Pool.load(tiny_chips(), split="valid").images()))), rel=1e-3)
    # wrong labels: accuracy vs the intended taxon collapses while the real accuracy stays
    wrong = evaluate_samples(_pool_from(tmp_path / "wrong", "valid", {"jellyfish": "penguin", "penguin": "starfish",
                                                                      "starfish": "jellyfish"}),
                             tiny_chips(), scorer, tmp_path / "r2")
    right = evaluate_samples(_pool_from(tmp_path / "right", "valid"), tiny_chips(), scorer, tmp_path / "r3")
    assert wrong["overall"]["taxon_accuracy"]["generated"] < 0.3
    assert right["overall"]["taxon_accuracy"]["generated"] == pytest.approx(right["overall"]["taxon_accuracy"]["real"])
    assert right["accuracy_per_level"]["phylum"]["real"]["n"] == 75
    assert right["overall"]["fd"]["generated"] == pytest.approx(0, abs=1e-3)  # held-out vs itself
    assert right["overall"]["precision"]["generated"] == 1.0
    assert set(right["per_taxon"]) == {"Asteroidea", "Scyphozoa", "Spheniscidae"}
    for name in ("sample_quality.json", "sample_quality.md", "best_worst.png"):
        assert (tmp_path / "r3" / name).stat().st_size > 100
    md = (tmp_path / "r3" / "sample_quality.md").read_text()
    assert "| Fréchet distance |" in md and "| phylum |" in md


def test_evaluate_samples_cli(tmp_path, no_network):
    from cli import app

    judge_dir, _ = tiny_judge()
    gen = _pool_from(tmp_path / "gen", "valid")
    weights = _lpips_file(tmp_path / "lpips_alex.safetensors")
    res = CliRunner().invoke(app, ["evaluate-samples", "--generated", str(gen), "--real", str(tiny_chips()),
                                   "--features", f"judge:{judge_dir}", "--out", str(tmp_path / "rep"),
                                   "--device", "cpu", "--lpips", str(weights)])
    assert res.exit_code == 0, res.output
    assert "FD " in res.output and "LPIPS diversity" in res.output
    md = (tmp_path / "rep" / "sample_quality.md").read_text()
    assert "| LPIPS gen | LPIPS real |" in md and "| diversity (mean pairwise LPIPS) |" in md
    s = json.loads((tmp_path / "rep" / "sample_quality.json").read_text())
    assert s["lpips"] == {"file": str(weights), "net": "alex"}
    for d in s["per_taxon"].values():  # "generated" = the held-out chips: same pairs, same figure as the floor
        assert d["lpips_pairs_generated"] == d["lpips_pairs_real"] == 256  # 25 chips: 300 pairs, capped
        assert d["lpips_generated"] == pytest.approx(d["lpips_real"], rel=1e-5) and d["lpips_generated"] > 0
    res = CliRunner().invoke(app, ["evaluate-samples", "--generated", str(gen), "--real", str(tiny_chips()),
                                   "--features", f"judge:{judge_dir}", "--out", str(tmp_path / "y"),
                                   "--lpips", str(tmp_path / "none.safetensors")])
    assert res.exit_code == 1 and "none.safetensors" in res.output and "save_model" in res.output
    res = CliRunner().invoke(app, ["evaluate-samples", "--generated", str(tmp_path / "missing"), "--real",
                                   str(tiny_chips()), "--features", f"judge:{judge_dir}", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "manifest.jsonl" in res.output


def test_sample_quality_benchmark_on_tiny_generator(aquarium_chips, tmp_path):
    """benchmarks/sample_quality.py end to end: a tiny diffusion model trained a few steps on real
    chips, both guidance modes, features from a tiny random open_clip model in a local folder."""
    import sys

    from synthgen.train import TrainConfig, train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sample_quality

    chips = aquarium_chips(tmp_path / "chips", labels=("penguin", "starfish"), per_label=4)
    cfg = TrainConfig(preset="tiny", image_size=32, mode="flat", steps_per_stage=1, batch_size=4, warmup_steps=1,
                      device="cpu")
    model = train(cfg, tmp_path / "model", chips=chips, progress=False).out
    clip = tiny_open_clip(tmp_path / "clip")
    out = tmp_path / "report"
    rc = sample_quality.main(["--model", f"flat={model}", "--chips", str(chips), "--features", f"bioclip:{clip}",
                              "--n", "3", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                              "--rare", "starfish", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "sample_quality.json").read_text())
    assert set(s["arms"]) == {"flat-taxonomic", "flat-cfg"}
    for arm in s["arms"].values():
        assert arm["rare"]["starfish"]["n_generated"] == 3 and arm["n_generated"] == 6
        assert 0 <= arm["overall"]["taxon_accuracy"]["generated"] <= 1
    pools = [json.loads(x) for x in (out / "pools" / "flat-cfg" / "manifest.jsonl").read_text().splitlines()]
    assert len(pools) == 6 and {r["guidance"]["mode"] for r in pools} == {"cfg"}
    md = (out / "sample_quality.md").read_text()
    assert "| flat-taxonomic |" in md and "Rarest taxa" in md and "| flat-cfg | starfish | 3 |" in md
    assert " ± " in md  # taxon accuracy carries its sampling error
    assert (out / "flat-cfg" / "sheet.png").stat().st_size > 100 and (out / "real_heldout_sheet.png").exists()


@pytest.mark.slow
def test_evaluate_samples_imagenet_default_holds_out_without_val_split(tmp_path, no_network):
    """No --features: ImageNet EfficientNet-Lite0 features. Real chips with only a train split: whole
    source images are held out, and the output says so. --judge adds per-rank accuracy."""
    from cli import app

    rows = [json.loads(x) for x in (tiny_chips() / "manifest.jsonl").read_text().splitlines()]
    real = tmp_path / "real"
    real.mkdir()
    (real / "manifest.jsonl").write_text("".join(
        json.dumps(r | {"file": str(tiny_chips() / r["file"]), "split": "train"}) + "\n" for r in rows))
    gen = _pool_from(tmp_path / "gen", "valid")
    args = ["evaluate-samples", "--generated", str(gen), "--real", str(real), "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "has no val split" in res.output and "two-sample accuracy" in res.output
    s = json.loads((tmp_path / "rep" / "sample_quality.json").read_text())
    assert s["features"].startswith("tf_efficientnet_lite0") and s["judge"] is None
    assert s["n"]["real"] + s["n"]["train"] == len(rows) and 0 < s["n"]["real"] < len(rows) / 2
    ts = s["overall"]["two_sample"]
    assert ts["interval_generated"][0] <= ts["generated"] <= ts["interval_generated"][1]
    md = (tmp_path / "rep" / "sample_quality.md").read_text()
    assert "has no val split" in md and "two-sample classifier accuracy" in md and "| phylum |" not in md
    judge_dir, _ = tiny_judge()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "rep2"), "--judge", str(judge_dir)])
    assert res.exit_code == 0, res.output
    s2 = json.loads((tmp_path / "rep2" / "sample_quality.json").read_text())
    assert s2["overall"]["fd"] == s["overall"]["fd"]  # same features (from the content cache), same split
    assert s2["accuracy_per_level"]["phylum"]["generated"]["n"] == s2["n"]["generated"]
    assert (tmp_path / "rep2" / "best_worst.png").is_file()

"""`synthgen filter`: wrong-taxon chips are rejected by a judge trained on real chips, the input pool
is never changed, rejects are set aside with a reason, runs resume, duplicates and copies go, and
on a one-species dataset `p_animal` keeps real seals and drops pure noise."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import LINEAGE, noise_images, seal_chips, seal_judge, tiny_chips, tiny_judge
from typer.testing import CliRunner

from synthgen.errors import SynthgenError
from synthgen.filter import FilterConfig, decide, filter_pool
from synthgen.scoring import JudgeScorer, Pool


def _pool(tmp: Path, spec: list[tuple[str, str, int]]) -> Path:
    """A generated-style pool from real valid chips: (true label, claimed label, how many)."""
    chips = Pool.load(tiny_chips(), split="valid")
    rows = []
    for true, claimed, n in spec:
        src = [r for r in chips.rows if r["label"] == true][:n]
        for r in src:
            f = f"{claimed}/{true}_{Path(r['file']).name}"
            (tmp / claimed).mkdir(parents=True, exist_ok=True)
            shutil.copy(chips.path(r), tmp / f)
            taxon, lin = LINEAGE[claimed]
            rows.append({"file": f, "label": claimed, "taxon": taxon, "lineage": lin, "seed": len(rows),
                         "true_label": true})
    (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_filter_rejects_wrong_taxon_keeps_right_ones(tmp_path):
    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("jellyfish", "penguin", 25), ("starfish", "jellyfish", 25),
                                     ("jellyfish", "jellyfish", 25), ("penguin", "penguin", 25)])
    before = _digest(pool)
    s = filter_pool(pool, JudgeScorer(judge_dir, device="cpu"), tmp_path / "out",
                    FilterConfig(threshold=0.5, dedup_cosine=None))
    assert _digest(pool) == before  # input untouched
    kept = Pool.load(tmp_path / "out").rows
    rej = Pool.load(tmp_path / "out" / "rejected").rows
    assert len(kept) + len(rej) == 100 and s["kept"] == len(kept)

    def rate(rows, true, claimed):
        return sum(r["true_label"] == true and r["label"] == claimed for r in rows) / 25

    wrong_rejected = (rate(rej, "jellyfish", "penguin") + rate(rej, "starfish", "jellyfish")) / 2
    right_kept = (rate(kept, "jellyfish", "jellyfish") + rate(kept, "penguin", "penguin")) / 2
    assert wrong_rejected >= 0.8, wrong_rejected
    assert right_kept >= 0.6, right_kept
    assert all(r["kept"] and r["scores"]["judge.p_taxon"] >= 0.5 for r in kept)
    assert all(not r["kept"] and r["reject_reason"] == "low_score" for r in rej)
    assert all((tmp_path / "out" / r["file"]).is_file() for r in kept)
    assert all((tmp_path / "out" / "rejected" / r["file"]).is_file() for r in rej)
    assert s["per_taxon"]["Spheniscidae"]["n"] == 50
    summary = json.loads((tmp_path / "out" / "filter_summary.json").read_text())
    assert summary["per_taxon"] == s["per_taxon"]


def test_filter_resumes_without_rescoring(tmp_path, monkeypatch):
    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("jellyfish", "jellyfish", 20), ("penguin", "jellyfish", 20)])
    scorer = JudgeScorer(judge_dir, device="cpu", batch_size=8)
    real = scorer.embed_images
    seen = []

    def dies_on_third_batch(images):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(len(images))
        return real(images)

    monkeypatch.setattr(scorer, "embed_images", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        filter_pool(pool, scorer, tmp_path / "out", FilterConfig(dedup_cosine=None))
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    seen.clear()
    monkeypatch.setattr(scorer, "embed_images", lambda images: seen.append(len(images)) or real(images))
    s = filter_pool(pool, scorer, tmp_path / "out", FilterConfig(dedup_cosine=None))
    assert sum(seen) == 40 - 16  # the two finished batches were not scored again
    fresh = filter_pool(pool, JudgeScorer(judge_dir, device="cpu"), tmp_path / "fresh", FilterConfig(dedup_cosine=None))
    assert s["per_taxon"] == fresh["per_taxon"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len({r["file"] for r in rows}) == len(rows)  # no duplicates after the resume


def test_calibrated_topk_near_copy_and_duplicates(tmp_path):
    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("jellyfish", "jellyfish", 12), ("penguin", "penguin", 12)])
    # a training chip pasted into the pool (memorised) and an exact duplicate of a pool chip
    train = Pool.load(tiny_chips(), split="train")
    copy_row = next(r for r in train.rows if r["label"] == "penguin")
    shutil.copy(train.path(copy_row), pool / "penguin" / "copy_of_train.png")
    rows = Pool.load(pool).rows
    shutil.copy(pool / rows[0]["file"], pool / "jellyfish" / "dup.png")
    extra = [rows[-1] | {"file": "penguin/copy_of_train.png", "true_label": "penguin"},
             rows[0] | {"file": "jellyfish/dup.png"}]
    (pool / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))

    scorer = JudgeScorer(judge_dir, device="cpu")
    cfg = FilterConfig(mode="calibrated", percentile=20, dedup_cosine=0.999, copy_cosine=0.999)
    s = filter_pool(pool, scorer, tmp_path / "cal", cfg, reference=tiny_chips())
    rej = {r["file"]: r["reject_reason"] for r in Pool.load(tmp_path / "cal" / "rejected").rows}
    assert rej["penguin/copy_of_train.png"] == "near_copy"
    assert "duplicate" in {rej.get("jellyfish/dup.png"), rej.get(rows[0]["file"])}
    thr = {t: d["threshold"] for t, d in s["per_taxon"].items()}
    # thresholds come from the real held-out chips of each taxon, so they differ per taxon
    assert set(thr) == {"Scyphozoa", "Spheniscidae"} and thr["Scyphozoa"] != thr["Spheniscidae"]
    assert "judge.centroid_cos" in Pool.load(tmp_path / "cal").rows[0]["scores"]

    s = filter_pool(pool, scorer, tmp_path / "top", FilterConfig(mode="topk", top_k=5, dedup_cosine=None,
                                                                   copy_cosine=None))
    kept = Pool.load(tmp_path / "top").rows
    assert s["per_taxon"]["Scyphozoa"]["kept"] == 5 and s["per_taxon"]["Spheniscidae"]["kept"] == 5
    for t in ("Scyphozoa", "Spheniscidae"):
        worst_kept = min(r["scores"]["judge.p_taxon"] for r in kept if r["taxon"] == t)
        best_rej = max(r["scores"]["judge.p_taxon"] for r in Pool.load(tmp_path / "top" / "rejected").rows
                       if r["taxon"] == t)
        assert worst_kept >= best_rej


def test_bars_rise_to_held_out_real(tmp_path):
    """Distinct real animals are neither copies nor duplicates: where the fixed bars sit below their
    similarity (one species in a judge's features), the bars raised to what held-out real chips reach
    keep them and still catch a pasted training chip and an exact duplicate."""
    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("penguin", "penguin", 8)])
    train = Pool.load(tiny_chips(), split="train")
    shutil.copy(train.path(next(r for r in train.rows if r["label"] == "penguin")), pool / "penguin" / "copy.png")
    rows = Pool.load(pool).rows
    shutil.copy(pool / rows[0]["file"], pool / "penguin" / "dup.png")
    rows += [rows[-1] | {"file": "penguin/copy.png", "seed": 98}, rows[0] | {"file": "penguin/dup.png", "seed": 99}]
    (pool / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = JudgeScorer(judge_dir, device="cpu")
    fixed = {"threshold": 0.0, "dedup_cosine": 0.0, "copy_cosine": 0.0}
    s = filter_pool(pool, scorer, tmp_path / "fixed", FilterConfig(**fixed, distinct_percentile=None),
                    reference=tiny_chips())
    assert s["copy_bar"] == 0.0 and s["per_taxon"]["Spheniscidae"]["near_copy"] == 10  # a bar of 0: all copies
    s = filter_pool(pool, scorer, tmp_path / "cal", FilterConfig(**fixed, distinct_percentile=100),
                    reference=tiny_chips())
    rej = {r["file"]: r["reject_reason"] for r in Pool.load(tmp_path / "cal" / "rejected").rows}
    assert 0 < s["copy_bar"] == s["dedup_bar"] < 0.9999
    assert rej.pop("penguin/copy.png") == "near_copy" and list(rej.values()) == ["duplicate"]
    assert set(rej) <= {"penguin/dup.png", rows[0]["file"]}


def test_in_place_moves_rejects_inside_pool(tmp_path):
    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("jellyfish", "penguin", 6), ("penguin", "penguin", 6)])
    s = filter_pool(pool, JudgeScorer(judge_dir, device="cpu"), None, FilterConfig(dedup_cosine=None),
                    in_place=True)
    kept, rej = Pool.load(pool).rows, Pool.load(pool / "rejected").rows
    assert len(kept) == s["kept"] and len(rej) == 12 - s["kept"] and len(rej) > 0
    assert all((pool / "rejected" / r["file"]).is_file() and not (pool / r["file"]).exists() for r in rej)


def test_decide_by_hand():
    rows = [{"file": f"{i}.png", "taxon": t} for i, t in enumerate("AAAB")]
    scores = {f"{i}.png": {"s": v} for i, v in enumerate([0.9, 0.8, 0.2, 0.7])}
    emb = np.array([[1, 0], [1, 0.001], [0, 1], [0, 1]], dtype=np.float32)  # 0 and 1 near-identical
    train = np.array([[0.0, 1.0]])  # 2 and 3 are copies of a training chip
    cfg = FilterConfig(threshold=0.5, dedup_cosine=0.99, copy_cosine=0.99)
    assert decide(rows, scores, emb, "s", cfg, {}, train) == [None, "duplicate", "near_copy", "near_copy"]
    assert decide(rows, scores, emb, "s", cfg, {}, train, distinct=1.0) == [None, None, "low_score", None]
    assert decide(rows, scores, emb, "s", cfg, {"A": 0.95}, None) == ["low_score", "low_score", "low_score", None]
    top = FilterConfig(mode="topk", top_k=1, dedup_cosine=None)
    assert decide(rows, scores, emb, "s", top, {}, None) == [None, "not_top_k", "not_top_k", None]


def test_filter_errors_and_cli(tmp_path):
    from cli import app

    judge_dir, _ = tiny_judge()
    pool = _pool(tmp_path / "pool", [("penguin", "penguin", 4)])
    bad = tmp_path / "bad"
    shutil.copytree(pool, bad)
    with (bad / "manifest.jsonl").open("a") as f:
        f.write(json.dumps({"file": "x.png", "label": "shark", "taxon": "Selachimorpha"}) + "\n")
    with pytest.raises(SynthgenError, match=r"bad/manifest.jsonl:5: taxon 'Selachimorpha'"):
        filter_pool(bad, JudgeScorer(judge_dir, device="cpu"), tmp_path / "o")
    with pytest.raises(SynthgenError, match="output folder is the input pool"):
        filter_pool(pool, JudgeScorer(judge_dir, device="cpu"), pool)
    res = CliRunner().invoke(app, ["filter", "--pool", str(pool), "--scorer", f"judge:{judge_dir}",
                                   "--out", str(tmp_path / "cli"), "--threshold", "0.3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    flat = res.output.replace("\n", "")
    assert "pass rates" in flat and "kept 4 of 4 chips" in flat and str(tmp_path / "cli") in flat
    res = CliRunner().invoke(app, ["filter", "--pool", str(pool), "--scorer", "judge:/nope", "--out", "x"])
    assert res.exit_code == 1 and "not a judge folder" in res.output


def test_p_animal_keeps_seals_drops_noise(tmp_path):
    """One species: taxon heads pass anything, the animal-vs-background head must not."""
    judge_dir, _ = seal_judge()
    chips, _ = seal_chips()
    real = Pool.load(chips, split="val")
    pool = tmp_path / "pool"
    (pool / "seal").mkdir(parents=True)
    rows = []
    for i, r in enumerate(real.rows[:20]):
        shutil.copy(real.path(r), pool / "seal" / f"real_{i}.png")
        rows.append({"file": f"seal/real_{i}.png", "label": "seal", "taxon": r["taxon"], "lineage": r["lineage"],
                     "true_label": "seal"})
    for i, im in enumerate(noise_images(20, seed=1)):
        im.save(pool / "seal" / f"noise_{i}.png")
        rows.append(rows[0] | {"file": f"seal/noise_{i}.png", "true_label": "noise"})
    (pool / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = JudgeScorer(judge_dir, device="cpu")
    only_score = {"score": "p_animal", "dedup_cosine": None, "copy_cosine": None}
    for name, cfg in (("fixed", FilterConfig(threshold=0.5, **only_score)),
                      ("calibrated", FilterConfig(mode="calibrated", percentile=10, **only_score))):
        s = filter_pool(pool, scorer, tmp_path / name, cfg, reference=chips)
        kept = Pool.load(tmp_path / name).rows
        n_real = sum(r["true_label"] == "seal" for r in kept)
        assert n_real >= 15 and len(kept) - n_real <= 3, (name, s["per_taxon"])
        assert all(r["scores"]["judge.p_animal"] >= s["per_taxon"]["Phoca vitulina"]["threshold"] for r in kept)

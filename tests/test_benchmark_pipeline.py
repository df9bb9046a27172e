"""The benchmark end to end at tiny scale on the real seals: stages, caching, evaluation, report."""

from __future__ import annotations

import json

import pytest

from synthgen.benchmark import BenchmarkConfig, ScaleConfig, run_benchmark
from synthgen.benchmark.cache import StageCache, stage_hash
from synthgen.benchmark.report import write_report


def test_stage_cache_skips_reruns_and_rebuilds_on_change(tmp_path):
    calls = []

    def build(d):
        calls.append(d.name)
        (d / "x.txt").write_text("ok")
        return {"n": len(calls)}

    c = StageCache(tmp_path)
    assert c.run("a", stage_hash({"lr": 1}), build) == {"n": 1}
    assert c.run("a", stage_hash({"lr": 1}), build) == {"n": 1} and calls == ["a"]
    assert c.run("a", stage_hash({"lr": 2}), build) == {"n": 2}
    # killed mid-way (no marker): non-resumable stages start clean, resumable ones keep their folder
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "partial").write_text("half")
    c.run("b", "k", lambda d: {"kept": (d / "partial").exists()})
    assert json.loads((tmp_path / "b" / ".done.json").read_text())["result"] == {"kept": False}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".inputs.json").write_text(json.dumps({"hash": "k"}))
    (tmp_path / "r" / "last.pt").write_text("ckpt")
    assert c.run("r", "k", lambda d: {"kept": (d / "last.pt").exists()}, resumable=True) == {"kept": True}


def _cfg(seals, epochs=1) -> BenchmarkConfig:
    scale = ScaleConfig(
        fractions=[0.01, 0.02], seeds=[0, 1],
        detector={"model": "yolov8n.yaml", "imgsz": 64, "epochs": epochs, "batch": 8, "workers": 0},
    )
    return BenchmarkConfig(
        name="seals-tiny", dataset=str(seals), group_pattern=r"^(.+?)_jpg\.rf\.", val_fraction=0.02,
        scales={"tiny": scale},
    )


@pytest.mark.slow
def test_tiny_benchmark_runs_caches_and_reports(seals, tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    res = run_benchmark(_cfg(seals), "tiny", out, work, device="cpu", progress=False)

    # split protocol: valid is the test set, train groups never cross train/val
    assert res["split"]["counts"]["test"] == 151
    assert res["split"]["leaked_groups_dropped"] == 0
    runs = res["runs"]
    assert {(r["arm"], r["fraction"], r["seed"]) for r in runs} == {
        ("real", f, s) for f in (0.01, 0.02) for s in (0, 1)
    }
    for r in runs:
        assert 0 <= r["map50"] <= 1 and r["n_images"] == 151 and r["n_gt"] == 261  # README: 261 seals
    # synthetic stages not installed in this checkout: said so, not silently dropped
    assert set(res["skipped_arms"]) == {"copy_paste", "synthgen", "synth_only", "pretrain_finetune"}

    md = (out / "report.md").read_text()
    assert "Not answered" in md and "real + synthgen arm was not run" in md
    assert "## Results" in md and "0.01" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and 'src="map_vs' not in html
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(json.dumps(runs))

    # second run: everything cached, identical numbers
    res2 = run_benchmark(_cfg(seals), "tiny", out, work, device="cpu", progress=False)
    assert res2["stages"]["ran"] == 0 and res2["runs"] == runs

    # changing the detector schedule redoes detectors + evaluation only, not split or subsets
    res3 = run_benchmark(_cfg(seals, epochs=2), "tiny", out, work, device="cpu", progress=False)
    assert res3["stages"]["ran"] == 8  # 4 detectors + 4 evaluations
    assert res3["stages"]["cached"] == 5  # split + 4 subsets


def test_report_states_goal_outcome_from_paired_runs(tmp_path):
    """Report logic on a results set in the real format (numbers chosen to exercise the verdict)."""
    base = json.loads(json.dumps(_cfg_dict()))
    runs = []
    for seed in (0, 1, 2):
        for arm, m in (("real", 0.30), ("copy_paste", 0.33), ("synthgen", 0.37)):
            runs.append({"arm": arm, "fraction": 0.1, "seed": seed, "map50": m + 0.01 * seed, "map50_95": m / 2,
                         "precision": 0.5, "recall": 0.5, "f1": 0.5, "count_mae": 1.0,
                         "ap50_per_class": {"seal": m}})
    res = {"name": "x", "scale": "tiny", "config": base, "runs": runs, "skipped_arms": {}, "example_tiles": [],
           "split": {"names": ["seal"], "counts": {"test": 1, "train": 1, "val": 1}, "leaked_groups_dropped": 0,
                     "groups": {"train": 1, "val": 1, "test": 1}}, "stages": {"ran": 0, "cached": 0}}
    md = write_report(res, tmp_path).read_text()
    assert "+7.0 mAP50 points" in md and "**met**" in md and "beats copy-paste" in md


def _cfg_dict() -> dict:
    return BenchmarkConfig(name="x", dataset="/tmp", scales={"tiny": ScaleConfig()}).model_dump(mode="json")

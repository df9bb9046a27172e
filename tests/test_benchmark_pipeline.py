"""The benchmark end to end at tiny scale on the real seals: stages, caching, evaluation, report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from synthgen.benchmark import BenchmarkConfig, ScaleConfig, run_benchmark
from synthgen.benchmark.cache import StageCache, stage_hash
from synthgen.benchmark.config import ArmsConfig
from synthgen.benchmark.report import stage_times, write_report

ALL_ARMS = {"copy_paste": {}, "synthgen": {}, "synth_only": {}, "pretrain_finetune": {}, "real_long": {}}


def test_stage_cache_skips_reruns_and_rebuilds_on_change(tmp_path):
    calls = []

    def build(d):
        calls.append(d.name)
        (d / "x.txt").write_text("ok")
        return {"n": len(calls)}

    c = StageCache(tmp_path)
    cfg = tmp_path / "compose.yaml"
    cfg.write_text("count: {mean: 4}\n")
    before = stage_hash({"config": str(cfg)})
    cfg.write_text("count: {mean: 5}\n")
    assert stage_hash({"config": str(cfg)}) != before  # a named config file hashes by content
    other = tmp_path / "checkout2" / "compose.yaml"  # ... not by path: another checkout keeps the cache
    other.parent.mkdir()
    other.write_text(cfg.read_text())
    assert stage_hash({"config": str(other)}) == stage_hash({"config": str(cfg)})
    assert c.run("a", stage_hash({"lr": 1}), build) == {"n": 1}
    took = c.seconds["a"]
    assert c.run("a", stage_hash({"lr": 1}), build) == {"n": 1} and calls == ["a"]
    assert c.seconds["a"] == took >= 0  # a cached stage reports the wall time it took when it ran
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


def _cfg(seals, configs, conf=0.25, arms=None) -> BenchmarkConfig:
    scale = ScaleConfig(
        fractions=[0.01], seeds=[0],
        detector={"model": "yolov8n.yaml", "imgsz": 64, "epochs": 1, "batch": 8, "workers": 0},
        operating_conf=conf,
        synthetic_images=4,
        chips={"size": 32},
        generator={"preset": "tiny", "image_size": 32, "steps_per_stage": 2, "batch_size": 4, "warmup_steps": 1,
                   "checkpoint_every": 3, "device": "cpu"},
        generate={"n": 4, "steps": 2, "batch_size": 4, "device": "cpu"},
        # the judge trains on the cell's real chips; a threshold below any cosine keeps every noise chip
        filter={"score": "centroid_cos", "threshold": -1.0, "dedup_cosine": None,
                "judge": {"epochs": 1, "img_size": 32, "batch_size": 8, "device": "cpu"}},
        # a 2-step tiny generator makes noise: accept any mask so its tiles still reach the detector
        compose={"config": str(configs / "compose" / "glacierbay-seals.yaml"),
                 "mask": {"min_area": 0.0, "max_area": 100.0, "max_edges_touched": 4, "max_second_blob": 100.0,
                          "min_box_iou": 0.0}},
    )
    return BenchmarkConfig(
        name="seals-tiny", dataset=str(seals), taxonomy=str(configs / "taxonomy" / "glacierbay-seals.csv"),
        groups={"tile": r"^(.+?)_jpg\.rf\.", "frame": r"^(.+)_\d+_\d+_jpg\.rf\."}, val_fraction=0.02,
        scales={"tiny": scale}, arms=ArmsConfig(**(arms if arms is not None else ALL_ARMS)),
    )


@pytest.mark.slow
def test_tiny_benchmark_all_arms_runs_caches_and_reports(seals, configs, tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    res = run_benchmark(_cfg(seals, configs), "tiny", out, work, device="cpu", progress=False)

    # split protocol: valid is the test set, train groups never cross train/val
    assert res["split"]["counts"]["test"] == 151
    assert res["split"]["leak"]["train_images_dropped"] == 555
    runs = res["runs"]
    assert res["skipped_arms"] == {}
    assert sorted(r["arm"] for r in runs) == sorted(["real", "copy_paste", "synthgen", "synth_only",
                                                     "pretrain_finetune", "real_long"])
    steps = {r["arm"]: r["optimizer_steps"] for r in runs}  # the control takes arm 5's optimizer steps
    assert steps["real_long"] >= steps["pretrain_finetune"] - steps["real"] // 2 and steps["real_long"] > 0
    for r in runs:
        assert 0 <= r["map50"] <= 1 and r["n_images"] == 151 and r["n_gt"] == 261  # README: 261 seals
    cell = work / "cells" / "f0.01-s0"
    real = set((cell / "subset" / "train_real_source.txt").read_text().split())
    chips = [json.loads(x)["source_image"] for x in (cell / "chips" / "manifest.jsonl").read_text().splitlines()]
    assert chips and set(chips) <= real  # the generator saw only this cell's real training images
    synth = (cell / "compose-synthgen" / "train_synthetic.txt").read_text().split()
    assert len(synth) == 4
    # the filter's judge and its calibration chips come from this cell's real chips only
    ref = [json.loads(x) for x in (cell / "filtered" / "reference" / "manifest.jsonl").read_text().splitlines()]
    assert {r["split"] for r in ref} <= {"train", "val"} and {r["source_image"] for r in ref} <= real
    kept = (cell / "filtered" / "kept" / "manifest.jsonl").read_text().splitlines()
    assert len(kept) == 4 and (cell / "filtered" / "judge" / "judge.safetensors").is_file()
    pasted = {json.loads(x)["pool"] for x in (cell / "compose-synthgen" / "provenance.jsonl").read_text().splitlines()}
    assert pasted == {str((cell / "filtered" / "kept").resolve())}
    # the test list holds links into work/data/; they resolve to the seal images, none of them trained on
    test_imgs = {os.path.realpath(p) for p in (work / "split" / "test.txt").read_text().split()}
    assert len(test_imgs) == 151 and all(p.startswith(str(seals.resolve()) + os.sep) for p in test_imgs)
    assert not test_imgs & {os.path.realpath(p) for p in real}

    md = (out / "report.md").read_text()
    assert "At 1% real, 3b. real + cut-and-paste synthgen vs real-only" in md and "## Results" in md
    assert "**Goal:**" in md and "## Stage wall times" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and 'src="map_vs' not in html
    assert (out / "example_synthetic_tiles.png").is_file() and (out / "example_instances.png").is_file()
    inst = res["example_instances"]  # what the generator drew, kept and rejected, beside the real chips
    assert len(inst["generated, kept"]) == 4 and all(Path(f).is_file() for v in inst.values() for f in v)
    assert inst["real training chips"] and {Path(f).name for f in inst["real training chips"]} <= {
        Path(json.loads(x)["file"]).name for x in (cell / "chips" / "manifest.jsonl").read_text().splitlines()}
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(json.dumps(runs))

    # second run: everything cached, identical numbers
    res2 = run_benchmark(_cfg(seals, configs), "tiny", out, work, device="cpu", progress=False)
    assert res2["stages"]["ran"] == 0 and res2["runs"] == runs

    # changing an evaluation setting redoes the evaluations only: no data, generator or detector stage
    res3 = run_benchmark(_cfg(seals, configs, conf=0.5), "tiny", out, work, device="cpu", progress=False)
    assert res3["stages"]["ran"] == 6  # one evaluation per arm
    # split, subset, chips (x2: copy-paste and synthgen share it), generator, generated, filtered,
    # 2 composes, 6 detectors + synth_only reused by pretrain_finetune
    assert res3["stages"]["cached"] == 16
    assert [r["map50"] for r in res3["runs"]] == [r["map50"] for r in runs]  # mAP does not use the threshold


def test_missing_stage_is_reported_not_dropped(seals, configs, tmp_path, monkeypatch):
    """If a synthetic stage cannot run here, the arms that need it are listed with the reason."""
    from synthgen.benchmark import synthetic

    def unavailable(*a, **k):
        raise synthetic.StageUnavailable("synthgen.train.trainer.train is not available (test)")

    monkeypatch.setattr(synthetic, "train_generator", unavailable)
    monkeypatch.chdir(tmp_path)  # relative folders, as the CLI defaults give (runs/benchmarks/...)
    res = run_benchmark(_cfg(seals, configs, arms={"synthgen": {}}), "tiny", "r", "w", device="cpu",
                        progress=False)
    assert [r["arm"] for r in res["runs"]] == ["real"]
    assert "not available (test)" in res["skipped_arms"]["synthgen"]
    assert "Goal not answered" in (tmp_path / "r" / "report.md").read_text()


def _report(tmp_path, maps: dict[str, float]) -> str:
    """report.md for a results set in the real format, 3 seeds, with the given mean mAP50 per arm."""
    base = json.loads(json.dumps(_cfg_dict()))
    runs = []
    for seed in (0, 1, 2):
        for arm, m in maps.items():
            runs.append({"arm": arm, "fraction": 0.1, "seed": seed, "map50": m + 0.01 * seed, "map50_95": m / 2,
                         "precision": 0.5, "recall": 0.5, "f1": 0.5, "count_mae": 1.0,
                         "ap50_per_class": {"seal": m}})
    for r in runs:
        r["optimizer_steps"] = 100
    ivs = [{"test": "test", "arm": a, "fraction": 0.1, "mean": m - maps["real"], "lo": m - maps["real"] - 0.02,
            "hi": m - maps["real"] + 0.02, "half_width": 0.02, "n_seeds": 3} for a, m in maps.items() if a != "real"]
    res = {"name": "x", "scale": "tiny", "config": base, "runs": runs, "skipped_arms": {}, "example_tiles": [],
           "intervals": ivs, "stage_seconds": {"split": 3.0, "cells/f0.1-s0/real": 60.0,
                                               "cells/f0.1-s0/real/eval-test": 5.0},
           "split": {"names": ["seal"], "counts": {"test": 1, "train": 1, "val": 1}, "leaked_groups_dropped": 0,
                     "groups": {"train": 1, "val": 1, "test": 1}}, "stages": {"ran": 0, "cached": 0}}
    return write_report(res, tmp_path).read_text()


def test_report_states_goal_outcome_from_intervals(tmp_path):
    md = _report(tmp_path, {"real": 0.30, "copy_paste": 0.33, "synthgen": 0.37})
    assert "+7.0 points [95 % interval +5.0, +9.0]" in md and "helps (interval excludes zero)" in md
    assert "Goal: **met**" in md and "Not answerable" not in md and "## Stage wall times" in md
    # +1 point with an interval over zero: not shown to help, and the goal is stated as not met
    md = _report(tmp_path, {"real": 0.30, "copy_paste": 0.33, "synthgen": 0.31})
    assert "not shown to help (interval includes zero)" in md and "Goal: **not met**" in md
    assert "**Goal:** at 10% real, real + synthgen >= real-only + 5 mAP50 points" in md
    assert "What holds it back" in md


def test_stage_times_group_by_kind():
    t = stage_times({"split": 2.0, "cells/f0.1-s0/real": 10.0, "cells/f0.1-s1/real": 12.0,
                     "cells/f0.1-s0/real/eval-test": 1.0, "cells/f0.1-s0/generator": 30.0, "tests/x": 4.0})
    got = dict(zip(t.stage, t.seconds, strict=True))
    assert got == {"split": 2.0, "detector real": 22.0, "eval-test": 1.0, "generator": 30.0,
                   "further test set": 4.0, "total": 59.0}


def test_report_refuses_to_read_differences_over_an_unlearned_baseline(tmp_path):
    """A real-only detector near mAP50 0 makes every arm difference noise; the report must say so."""
    md = _report(tmp_path, {"real": 0.001, "copy_paste": 0.002, "synthgen": 0.004})
    assert "**Not answerable at this scale:**" in md and "mAP50 0.011" in md
    assert "Goal: **met**" not in md and "has not learned the task" in md


def _cfg_dict() -> dict:
    return BenchmarkConfig(name="x", dataset="/tmp", scales={"tiny": ScaleConfig()}).model_dump(mode="json")


def test_incontext_arm_calls_augment_dataset_with_the_generator(tmp_path, monkeypatch):
    """The in-context arm is the same augment-dataset call given `generator=MODEL` and no pool; an entry
    point that takes no generator reports the arm as not run, naming the config key."""
    import inspect

    from synthgen.benchmark import synthetic

    assert "generator" in inspect.signature(synthetic.augment_dataset).parameters  # the library's entry point
    lst = tmp_path / "train.txt"
    lst.write_text("a.jpg\n")
    monkeypatch.setattr(synthetic, "augment_dataset", lambda dataset, pools, out, **kw: None)
    with pytest.raises(synthetic.StageUnavailable, match="arms.incontext.model = /models/seal"):
        synthetic.paint("/data", "/models/seal", lst, tmp_path / "o", n_images=3, seed=0)
    calls = []

    def augment(dataset, pools, out, config=None, image_list=None, n_images=None, seed=None, generator=None):
        calls.append((dataset, pools, generator, n_images, seed, str(image_list)))
        (out / "train_synthetic.txt").parent.mkdir(parents=True, exist_ok=True)
        (out / "train_synthetic.txt").write_text("x.jpg\n")

    monkeypatch.setattr(synthetic, "augment_dataset", augment)
    got = synthetic.paint("/data", "/models/seal", lst, tmp_path / "o", n_images=3, seed=7)
    assert got == tmp_path / "o" / "train_synthetic.txt"
    assert calls == [("/data", [], "/models/seal", 3, 7, str(lst))]


@pytest.mark.slow
def test_smoke_scale_end_to_end_and_test_sets_add_evaluations_only(configs, seals, tmp_path):
    """The documented smoke scale runs every stage of the real config (native windows, sliced inference,
    every arm, intervals, report); a rerun with `--test NAME=DATA` retrains nothing: every earlier stage is
    a cache hit and only the further test set and its evaluations run."""
    from typer.testing import CliRunner

    from cli import app

    cfg = configs / "benchmarks" / "glacierbay-seals.yaml"
    work, out = tmp_path / "work", tmp_path / "report"
    res = run_benchmark(cfg, "smoke", out, work, device="cpu", progress=False)
    arms = {"real", "copy_paste", "synthgen", "synth_only", "pretrain_finetune", "real_long"}
    assert res["skipped_arms"] == {} and {r["arm"] for r in res["runs"]} == arms
    assert len(res["runs"]) == 12 and all(r["n_images"] == 12 for r in res["runs"])
    assert {(i["arm"], i["n_seeds"]) for i in res["intervals"]} == {(a, 2) for a in arms - {"real"}}
    assert all(i["lo"] <= i["mean"] <= i["hi"] for i in res["intervals"])
    windows = (work / "cells" / "f0.002-s0" / "subset" / "train_windows.txt").read_text().split()
    assert windows and all(Image.open(w).size == (320, 320) for w in windows[:5])
    md = (out / "report.md").read_text()
    assert "**Goal:**" in md and "Native scale: detectors train on 320 px windows" in md
    assert "their 555 train images (185 source tiles) are left out of training" in md

    before_ran, n_stages = res["stages"]["ran"], res["stages"]["ran"] + res["stages"]["cached"]
    # within the first run, per cell: chips shared by copy-paste and synthgen, arm 4's detector reused by arm 5
    assert res["stages"]["cached"] == 2 * 2 and before_ran == n_stages - 4
    later_yaml = tmp_path / "later" / "data.yaml"  # a user's own set: here 6 of the seals' valid tiles, by reference
    later_yaml.parent.mkdir()
    six = sorted((seals / "valid" / "images").iterdir())[:6]
    (tmp_path / "later" / "val.txt").write_text("".join(f"{p}\n" for p in six))
    later_yaml.write_text(f"path: {tmp_path / 'later'}\nval: val.txt\nnames: ['seal']\n")
    r = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--scale", "smoke", "--work", str(work),
                                 "--out", str(out), "--device", "cpu", "--test", f"later={later_yaml}"])
    assert r.exit_code == 0, r.output
    res2 = json.loads((out / "results.json").read_text())
    assert res2["stages"]["cached"] == n_stages  # every detector and data stage: a cache hit
    assert res2["stages"]["ran"] == 1 + 12  # the test set, and one evaluation per trained detector
    assert res2["runs"] == res["runs"]
    later = res2["further_tests"]["later"]
    assert len(later["runs"]) == 12 and later["info"]["images"] == 6
    # the seals' valid tiles: none shares a source tile with training, and none of their frames is
    # left in training either (those 555 train images were dropped)
    assert later["info"]["share_tile"] == 0 and later["info"]["share_frame"] == 0
    assert "## Further test set `later`" in (out / "report.md").read_text()


def test_generator_stage_key_covers_train_defaults():
    """The generator stage is keyed on the resolved TrainConfig: a default spelled out gives the same key,
    and a changed default (here the prediction type) gives a new one, so no stale generator is reused."""
    from synthgen.benchmark.cache import stage_hash
    from synthgen.benchmark.synthetic import generator_config

    implicit = stage_hash(generator_config(0, preset="tiny"))
    assert implicit == stage_hash(generator_config(0, preset="tiny", prediction_type="v_prediction"))
    assert implicit != stage_hash(generator_config(0, preset="tiny", prediction_type="epsilon"))
    assert implicit != stage_hash(generator_config(1, preset="tiny"))


def test_filter_stage_key_covers_filter_and_judge_defaults():
    """Likewise the filter stage: keyed on the resolved FilterConfig and JudgeConfig."""
    from synthgen.benchmark.cache import stage_hash
    from synthgen.benchmark.synthetic import filter_config

    implicit = stage_hash(filter_config(0, score="p_animal"))
    assert implicit == stage_hash(filter_config(0, score="p_animal", distinct_percentile=99.0, scorer="judge"))
    assert implicit != stage_hash(filter_config(0, score="p_animal", distinct_percentile=None))
    assert implicit != stage_hash(filter_config(0, score="p_animal", judge={"epochs": 3}))

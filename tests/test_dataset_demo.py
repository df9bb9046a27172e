"""`synthgen demo` (data + taxonomy steps) on the real shared data, with chips capped to stay fast."""

from __future__ import annotations

import json

from detection.chips import ChipConfig
from synthgen.demo import run_demo
from synthgen.io_utils import read_jsonl


def test_demo_summary(shared_data, tmp_path):
    s = run_demo(shared_data, tmp_path, ChipConfig(max_per_class=2), progress=False)
    d = json.loads((tmp_path / "summary.json").read_text())["datasets"]
    assert s["datasets"] == 2 and s["chips"] == 7 * 2 + 2
    assert d["aquarium"]["images"] == {"train": 448, "val": 127}
    assert d["aquarium"]["boxes"]["train"]["fish"] == 1961
    shark = d["aquarium"]["taxa"]["shark"]
    assert (shark["taxon"], shark["level"]) == ("Selachimorpha", "clade:class")
    assert shark["text"].startswith("a photo of Animalia Chordata Chondrichthyes")
    assert d["glacierbay-seals"]["empty_images"]["train"] == 65
    assert d["glacierbay-seals"]["taxa"]["seal"]["taxon"] == "Phoca vitulina"
    rows = read_jsonl(tmp_path / "glacierbay-seals" / "chips" / "manifest.jsonl")
    assert len(rows) == 2 and rows[0]["lineage"]["family"] == "Phocidae"
    md = (tmp_path / "summary.md").read_text()
    assert "| train | 448 | 1 | 3324 |" in md and "| seal | Phoca vitulina | species | 2917 |" in md
    assert run_demo(shared_data, tmp_path, ChipConfig(max_per_class=2), progress=False)["chips"] == 16  # resume


def test_demo_cli_names_missing_data(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    (tmp_path / "data").mkdir()  # the output may not lie inside the data folder, so they are siblings
    r = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "aquarium" in r.output and "dataset not found" in r.output

"""`synthgen train` / `synthgen generate` dispatch to the latent backend (config `backend: latent`,
model folder with latent_model.json) and print one-line summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app
from synthgen.io_utils import read_jsonl
from synthgen.latent.tiny import build_tiny_sd


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_cli_train_and_generate_latent(aquarium: Path, configs: Path, tmp_path: Path):
    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips

    chips = tmp_path / "chips"
    make_chips(read_dataset(aquarium, splits=["train"]), chips, ChipConfig(size=32, max_per_class=2),
               taxonomy=configs / "taxonomy" / "aquarium.csv", split="train")
    cfg = yaml.safe_load((configs / "latent" / "sd15-taxonomy.yaml").read_text())
    cfg.update(base_model=str(build_tiny_sd(tmp_path / "tiny-sd")), resolution=32, batch_size=2,
               levels=["phylum", "class"], steps_per_stage=1, lora={"rank": 4, "alpha": 4},
               conditioner={"hidden": 16}, gradient_checkpointing=False)
    cfg_path = tmp_path / "latent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    model = tmp_path / "model"
    res = runner.invoke(app, ["train", "--config", str(cfg_path), "--chips", str(chips), "--out", str(model),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output and (model / "lora.safetensors").is_file()
    assert json.loads((model / "model_index.json").read_text())["kind"] == "latent"
    pool = tmp_path / "pool"
    res = runner.invoke(app, ["generate", "--model", str(model), "--taxon", "fish", "--n", "2", "--out", str(pool),
                              "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "manifest.jsonl" in res.output
    rows = read_jsonl(pool / "manifest.jsonl")
    assert len(rows) == 2 and {r["taxon"] for r in rows} == {"Actinopterygii"}
    # no guidance flags: the latent kind's own defaults (classifier-free, 7.5), not the pixel kind's
    assert rows[0]["guidance"]["mode"] == "cfg" and rows[0]["guidance"]["scale"] == 7.5
    assert rows[0]["backend"] == "latent"
    res = runner.invoke(app, ["generate", "--model", str(model), "--taxon", "fish", "--n", "2", "--out", str(pool),
                              "--grid"])
    assert res.exit_code == 1 and "--grid" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["generate", "--model", str(model), "--taxon", "Megaptera", "--n", "1",
                              "--out", str(pool), "--device", "cpu"])
    assert res.exit_code == 1 and "Megaptera" in res.output and "Traceback" not in res.output

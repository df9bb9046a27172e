"""Issue 20, defect 1: no command writes inside one of its inputs. Every case builds a small copy of
a shared dataset (or a pool / model folder) at run time, runs the command with its output inside an
input, and asserts exit code 1, one line naming the output and the input, and the input unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from synthgen.errors import SynthgenError
from synthgen.io_utils import dataset_inputs, refuse_inside_inputs


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def seal_copy(seals, tmp_path) -> Path:
    """Six seal tiles with their labels and the dataset's own data.yaml, in a fresh folder."""
    root = tmp_path / "seals"
    for split in ("train", "valid"):
        imgs = sorted((seals / split / "images").glob("*.jpg"))[:3]
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        for img in imgs:
            shutil.copy(img, root / split / "images" / img.name)
            shutil.copy(seals / split / "labels" / f"{img.stem}.txt", root / split / "labels" / f"{img.stem}.txt")
    shutil.copy(seals / "data.yaml", root / "data.yaml")
    return root


@pytest.fixture
def pool(tmp_path) -> Path:
    """A one-chip instance pool (what chips and generate write)."""
    import numpy as np
    from PIL import Image

    p = tmp_path / "pool"
    p.mkdir()
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(p / "c0.png")
    (p / "manifest.jsonl").write_text(json.dumps({"file": "c0.png", "label": "seal", "taxon": "Phoca vitulina"}) + "\n")
    return p


def test_refuse_inside_inputs_follows_links_and_allows_siblings(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(data)
    refuse_inside_inputs(tmp_path / "out", [data, None], "output")  # a sibling is fine
    for out in (data, data / "images" / "x", link / "new"):
        with pytest.raises(SynthgenError, match="inside the input"):
            refuse_inside_inputs(out, [data], "output")


def test_dataset_inputs_of_a_yaml_file_are_its_root_and_every_folder_it_names(seal_copy):
    got = {Path(p).resolve() for p in dataset_inputs(seal_copy / "data.yaml")}
    assert {seal_copy.resolve(), (seal_copy / "data.yaml").resolve(), (seal_copy / "train" / "images").resolve(),
            (seal_copy / "valid" / "labels").resolve()} <= got


def test_dataset_inputs_of_a_yaml_with_absolute_lists_leave_its_folder_free(seal_copy, tmp_path):
    """The benchmark writes input.yaml (absolute image lists) beside the detector's run folder."""
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("".join(f"{p}\n" for p in sorted((seal_copy / "train" / "images").glob("*.jpg"))))
    run = tmp_path / "arm"
    run.mkdir()
    (run / "input.yaml").write_text(f"path: {run}\ntrain: {lst}\nval: {lst}\nnames: {{0: seal}}\n")
    inputs = dataset_inputs(run / "input.yaml")
    refuse_inside_inputs(run / "yolo", inputs, "run folder")
    with pytest.raises(SynthgenError):
        refuse_inside_inputs(seal_copy / "train" / "labels" / "x", inputs, "run folder")


def _one_line_refusal(r, out: Path, inp: str) -> None:
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert str(out) in lines[0] and "inside the input" in lines[0] and inp in lines[0], r.output


def test_augment_dataset_given_the_yaml_file_refuses_out_at_the_dataset_root(seal_copy, pool):
    """The README form (DATA/data.yaml) with --out DATA wrote into the input's images/ and labels/."""
    before = _checksums(seal_copy)
    r = CliRunner().invoke(app, ["augment-dataset", str(seal_copy / "data.yaml"), "--pool", str(pool),
                                 "--out", str(seal_copy)])
    _one_line_refusal(r, seal_copy, str(seal_copy))
    assert _checksums(seal_copy) == before


@pytest.mark.parametrize("case", ["chips-in-labels", "inspect-json", "augment-in-pool",
                                  pytest.param("generate-in-model", marks=pytest.mark.slow),  # imports diffusers
                                  "train-in-chips", "detect-in-source", "train-detector-in-dataset"])
def test_every_writing_command_refuses_an_output_inside_an_input(case, seal_copy, pool, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "synthgen_model.json").write_text("{}")
    yml = str(seal_copy / "data.yaml")
    out, protected, args = {
        "chips-in-labels": (seal_copy / "train" / "labels" / "chips", seal_copy,
                            ["data", "chips", yml, "--out", "OUT"]),
        "inspect-json": (seal_copy / "stats.json", seal_copy, ["data", "inspect", yml, "--json", "OUT"]),
        "augment-in-pool": (pool / "aug", pool, ["augment-dataset", yml, "--pool", str(pool), "--out", "OUT"]),
        "generate-in-model": (model / "pool", model, ["generate", "--model", str(model), "--taxon", "seal", "--n",
                                                      "2", "--out", "OUT"]),
        "train-in-chips": (pool / "gen", pool, ["train", "--chips", str(pool), "--out", "OUT"]),
        "detect-in-source": (seal_copy / "valid" / "images" / "pred", seal_copy / "valid" / "images",
                             ["detect", "--model", str(tmp_path / "m.pt"), "--source",
                              str(seal_copy / "valid" / "images"), "--out", "OUT"]),
        "train-detector-in-dataset": (seal_copy / "det", seal_copy, ["train-detector", "--data", yml, "--out", "OUT",
                                                                     "--device", "cpu"]),
    }[case]
    before = _checksums(protected)
    r = CliRunner().invoke(app, [str(out) if a == "OUT" else a for a in args])
    _one_line_refusal(r, out, str(protected))
    assert _checksums(protected) == before and not out.exists()

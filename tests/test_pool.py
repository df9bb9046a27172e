"""Pool rows: every stage's rows validate as one PoolRow; a bad row is one error naming file and line."""

from __future__ import annotations

import json

import pytest

from synthgen.pool import PoolError, read_pool, read_pool_lines

CHIP = {"file": "train/fish/IMG_1_3.png", "source_image": "/abs/IMG_1.jpg", "box": [0, 0, 9, 9], "label": "fish",
        "taxon": "Actinopterygii", "lineage": {"kingdom": "Animalia", "class": "Actinopterygii"}, "split": "train",
        "size": 64}
BACKGROUND = {"file": "train/background/IMG_1_bg0.png", "label": "background", "taxon": "background",
              "background": True, "split": "train", "box": [0, 0, 40, 40]}
GENERATED = CHIP | {"seed": 7, "sampler": "ddim", "steps": 20, "model": "abc123", "scores": {"p_taxon": 0.9},
                    "guidance": {"mode": "taxonomic", "scale": 2.0, "reference": "parent", "window": [0.0, 0.6]},
                    "kept": True}
INCONTEXT = {"file": "Phoca vitulina/000001.png", "taxon": "Phoca vitulina", "label": "seal", "lineage": {},
             "seed": 1, "tile": "/abs/t.jpg", "hole": [10, 10, 40, 40], "obb": [1, 2, 3, 4, 5, 6, 7, 8]}


def _write(folder, lines: list[str]):
    (folder / "manifest.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return folder


def test_rows_of_every_stage_validate_and_keep_their_own_keys(tmp_path):
    rows = [CHIP, BACKGROUND, GENERATED, INCONTEXT]
    _write(tmp_path, [json.dumps(r) for r in rows[:2]] + [""] + [json.dumps(r) for r in rows[2:]])
    assert read_pool(tmp_path) == rows
    assert [i for i, _ in read_pool_lines(tmp_path)] == [1, 2, 4, 5]  # blank line 3 skipped, numbering kept


def test_bad_rows_name_the_manifest_line(tmp_path):
    with pytest.raises(PoolError, match=r"manifest.jsonl: not found; make chips"):
        read_pool(tmp_path, missing="make chips")
    _write(tmp_path, [json.dumps(CHIP), json.dumps(CHIP | {"lineage": ["Animalia"]})])
    with pytest.raises(PoolError, match=r"manifest.jsonl:2: lineage: Input should be a valid dictionary"):
        read_pool(tmp_path)
    _write(tmp_path, [json.dumps(CHIP), json.dumps({"label": "fish"})])
    with pytest.raises(PoolError, match=r"manifest.jsonl:2: file: Field required"):
        read_pool(tmp_path)
    _write(tmp_path, [json.dumps(CHIP), "{oops", json.dumps(CHIP)])
    with pytest.raises(PoolError, match=r"manifest.jsonl:2: not valid JSON"):
        read_pool(tmp_path)
    _write(tmp_path, [json.dumps(CHIP), json.dumps(CHIP | {"taxon": ""})])
    with pytest.raises(PoolError, match=r"manifest.jsonl:2: row lacks taxon$"):
        read_pool(tmp_path, require=("file", "taxon"))


def test_torn_last_line_is_dropped(tmp_path):
    _write(tmp_path, [json.dumps(CHIP), json.dumps(GENERATED)[:30]])
    assert read_pool(tmp_path) == [CHIP]

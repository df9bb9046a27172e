"""Acceptance previews for augment-dataset on the Glacier Bay seals: cut real seal chips from the
first 150 training tiles, compose 24 tiles with configs/compose/glacierbay-seals.yaml, and save
320 px crops (around the pasted seals, green boxes = pasted labels, yellow = pasted polygon,
blue = real labels) of a few previews under benchmarks/results/compose_previews/.

    python benchmarks/compose_previews.py"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SEALS = REPO.parent / "shared" / "data" / "glacierbay-seals"
OUT = REPO / "benchmarks" / "results" / "compose_previews"


def main(n_crops: int = 3, side: int = 320) -> None:
    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips
    from synthgen.compose import augment_dataset

    work = Path(tempfile.mkdtemp(prefix="compose_previews_"))
    ds = read_dataset(SEALS, splits=["train"])
    make_chips(ds.subset("train", images=sorted(ds.images.image_path)[:150]), work / "pool", ChipConfig(size=96),
               progress=False)
    r = augment_dataset(SEALS, work / "pool", work / "out", REPO / "configs" / "compose" / "glacierbay-seals.yaml",
                        n_images=24, preview=24, seed=3)
    rows = [json.loads(x) for x in (r.out / "manifest.jsonl").read_text().splitlines()]
    rows.sort(key=lambda x: -x["n_pasted"])
    OUT.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows[:n_crops]):
        img = np.asarray(Image.open(r.out / "previews" / (Path(row["output"]).stem + ".png")))
        boxes = np.array([p["box"] for p in row["pasted"]], float)
        # the side x side window holding the most pasted box centres
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        best = max(((x, y) for x in range(0, img.shape[1] - side + 1, 40) for y in range(0, img.shape[0] - side + 1, 40)),
                   key=lambda p: ((cx >= p[0] + 20) & (cx < p[0] + side - 20) & (cy >= p[1] + 20)
                                  & (cy < p[1] + side - 20)).sum())
        x, y = best
        Image.fromarray(img[y:y + side, x:x + side]).save(OUT / f"seals_{i}.png", optimize=True)
    print(f"{r.n_tiles} tiles, {r.n_pasted} pasted -> {OUT}")


if __name__ == "__main__":
    main()

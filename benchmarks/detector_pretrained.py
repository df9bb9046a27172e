"""YOLO with an ImageNet EfficientNet-Lite0 backbone (configs/detector/yolov8n-lite0.yaml) vs yolov8n.yaml
from scratch, at equal CPU time, on a seeded 10 % of the real training images; mAP50 on the valid
split, mean ± sd over seeds.

Runs are single-threaded with data loading in-process (workers 0) and validate only at the end
(`val: False`). Per dataset and model, the CPU seconds of one epoch are measured as the process-time
difference of a 2-epoch and a 1-epoch probe (process time, not wall: the machine is shared); every
run then trains for as many epochs as fit in the budget, with its LR schedule planned for them. The 10 % draw is the benchmark's (`draw_fraction`: group-aware, stratified by
rarest taxon); groups are Roboflow source images, so augmented copies of one photo stay together.

    OMP_NUM_THREADS=1 python benchmarks/detector_pretrained.py --minutes 2 --seeds 0 1 2 \
        --work runs/eyes/detector --out benchmarks/results/detector_pretrained

`--curve EPOCHS --curve-model NAME` instead trains one model on seed 0's subset for EPOCHS epochs,
validating after each, and adds that learning curve (mAP50 against epochs and CPU seconds) to the
results: where the comparison's short budget sits on it, and whether longer training would reach a
usable mAP50 at this fraction.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from detection.dataset import group_ids
from detection.train import DetectorTrainConfig, train_detector, write_data_yaml
from synthgen.benchmark.data import load_dataset, write_list
from synthgen.benchmark.splits import draw_fraction
from synthgen.io_utils import atomic_write, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODELS = {"lite0-imagenet": str(REPO / "configs/detector/yolov8n-lite0.yaml"), "yolov8n-scratch": "yolov8n.yaml"}
ROBOFLOW_SOURCE = r"^(.*?)_(?:jpe?g|png)\.rf\."


def subset_yaml(root: Path, fraction: float, seed: int, work: Path) -> tuple[Path, int]:
    """data.yaml over a seeded `fraction` of the train images (absolute list) and the whole valid split."""
    images, boxes, names = load_dataset(root)
    train = images[images.split == "train"].copy()
    train["group"] = group_ids(train.image_path.tolist(), ROBOFLOW_SOURCE)
    files = draw_fraction(train, boxes[boxes.split == "train"], fraction, seed)
    val = sorted(images.image_path[images.split == "val"])
    work.mkdir(parents=True, exist_ok=True)
    write_list(work / "train.txt", files)
    write_list(work / "val.txt", val)
    return write_data_yaml(work / "data.yaml", names, work / "train.txt", work / "val.txt"), len(files)


def last_row(results_csv: Path) -> dict:
    with results_csv.open() as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return {"epochs": int(float(rows[-1]["epoch"])), "map50": float(rows[-1]["metrics/mAP50(B)"]),
            "map50_95": float(rows[-1]["metrics/mAP50-95(B)"]),
            "curve": [float(r["metrics/mAP50(B)"]) for r in rows]}


def run(name: str, model: str, data: Path, seed: int, epochs: int, imgsz: int, out: Path, val: bool = False) -> dict:
    cfg = DetectorTrainConfig(model=model, data=str(data), imgsz=imgsz, epochs=epochs, batch=16, seed=seed,
                              device="cpu", workers=0, patience=epochs, overrides={"val": val})
    t, w = time.process_time(), time.time()
    train_detector(cfg, out, verbose=False)
    res = last_row(out / "results.csv")
    return res | {"model": name, "seed": seed, "cpu_seconds": round(time.process_time() - t, 1),
                  "wall_seconds": round(time.time() - w, 1)}


def epoch_cpu(model: str, data: Path, imgsz: int, work: Path) -> float:
    """CPU seconds of one training epoch: 2-epoch probe minus 1-epoch probe (model build and final
    validation cancel out)."""
    cpu = [run("probe", model, data, 0, e, imgsz, work / f"probe{e}")["cpu_seconds"] for e in (1, 2)]
    return max(cpu[1] - cpu[0], 1.0)


def markdown(res: dict) -> str:
    lines = ["# YOLO detector: ImageNet EfficientNet-Lite0 backbone vs yolov8n from scratch", "",
             f"Reduced run: {res['minutes']} CPU minutes of training per run, imgsz {res['imgsz']}, "
             f"{res['fraction']:.0%} of the real training images, seeds {res['seeds']}; mAP50 on the whole valid "
             "split at the end of training (mean ± sd over seeds).", "", f"Command: `{res['command']}`", "",
             "| dataset | train images | model | CPU s/epoch | epochs | mAP50 (mean ± sd) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for ds, d in res["datasets"].items():
        for m in MODELS:
            runs = [r for r in d["runs"] if r["model"] == m]
            v = np.array([r["map50"] for r in runs])
            lines.append(f"| {ds} | {', '.join(str(n) for n in d['train_images'])} | {m} | "
                         f"{d['epoch_cpu_seconds'][m]:.0f} | {d['epochs'][m]} | {v.mean():.3f} ± "
                         f"{v.std(ddof=1) if len(v) > 1 else float('nan'):.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in v)} |")
    for ds, c in res.get("curves", {}).items():
        lines += ["", f"## Learning curve: {ds}, {c['model']}, seed 0's {res['fraction']:.0%} subset "
                  f"({c['train_images']} images), validated after every epoch", "",
                  "| epoch | CPU s with per-epoch validation (about) | mAP50 |", "|---|---|---|"]
        step = max(1, len(c["curve"]) // 15)
        for i, m in enumerate(c["curve"]):
            if i % step == 0 or i == len(c["curve"]) - 1:
                lines.append(f"| {i + 1} | {c['cpu_seconds'] * (i + 1) / len(c['curve']):.0f} | {m:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["glacierbay-seals", "aquarium"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--curve", type=int, help="only a learning curve of this many epochs (validated each epoch)")
    ap.add_argument("--curve-model", choices=list(MODELS), default="lite0-imagenet")
    a = ap.parse_args()
    a.work = a.work.resolve()  # data.yaml files name their lists relative to themselves
    torch.set_num_threads(1)
    if a.curve:
        learning_curve(a)
        return
    res = {"minutes": a.minutes, "imgsz": a.imgsz, "fraction": a.fraction, "seeds": a.seeds, "datasets": {},
           "command": "OMP_NUM_THREADS=1 python benchmarks/detector_pretrained.py " + " ".join(
               f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items())}
    a.out.mkdir(parents=True, exist_ok=True)
    for ds in a.datasets:
        d = res["datasets"][ds] = {"train_images": [], "runs": [], "epoch_cpu_seconds": {}, "epochs": {}}
        for seed in a.seeds:
            data, n = subset_yaml(DATA / ds, a.fraction, seed, a.work / ds / f"seed{seed}")
            d["train_images"].append(n)
            for name, model in MODELS.items():
                if name not in d["epochs"]:  # probed on the first seed's subset
                    d["epoch_cpu_seconds"][name] = epoch_cpu(model, data, a.imgsz, a.work / ds / name)
                    d["epochs"][name] = max(1, int(a.minutes * 60 // d["epoch_cpu_seconds"][name]))
                d["runs"].append(run(name, model, data, seed, d["epochs"][name], a.imgsz,
                                     a.work / ds / f"seed{seed}" / name))
                write_json(a.out / "results.json", res)  # partial results survive a kill
                print(json.dumps(d["runs"][-1] | {"curve": None}), flush=True)
    with atomic_write(a.out / "results.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    print(markdown(res))


def learning_curve(a) -> None:
    """Add real-only mAP50 against epochs (seed 0's subset) to an existing results.json."""
    res = json.loads((a.out / "results.json").read_text())
    for ds in a.datasets:
        data, n = subset_yaml(DATA / ds, a.fraction, 0, a.work / ds / "seed0")
        r = run(a.curve_model, MODELS[a.curve_model], data, 0, a.curve, a.imgsz,
                a.work / ds / f"curve-{a.curve_model}-{a.curve}", val=True)
        res.setdefault("curves", {})[ds] = {"model": a.curve_model, "train_images": n, "curve": r["curve"],
                                            "cpu_seconds": r["cpu_seconds"], "epochs": a.curve}
        write_json(a.out / "results.json", res)
        print(f"{ds}: mAP50 by epoch {', '.join(f'{m:.3f}' for m in r['curve'])}", flush=True)
    with atomic_write(a.out / "results.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))


if __name__ == "__main__":
    main()

"""The benchmark pipeline: split -> per (fraction, seed) cell: subset, chips, generator, generate,
filter, compose -> detectors per arm -> evaluation on the real test split -> report.

Split protocol (documented in every report): the dataset's `test_split` (e.g. `valid`) is the
test set; it is real, and never seen by the generator, the judge or any detector. The given
`train` split is divided by group (file-name pattern) into train and a validation part for early
stopping; real fractions are drawn from that train part by seed, stratified by taxon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from detection.metrics import evaluate
from detection.train import DetectorTrainConfig, train_detector, write_data_yaml
from synthgen.benchmark import synthetic
from synthgen.benchmark.cache import StageCache, stage_hash
from synthgen.benchmark.config import BenchmarkConfig, ScaleConfig
from synthgen.benchmark.data import canonical_split, load_dataset, materialize, write_list
from synthgen.benchmark.report import write_report
from synthgen.benchmark.splits import draw_fraction, group_ids, split_by_group
from synthgen.errors import SynthgenError
from synthgen.io_utils import write_json


def make_split(cfg: BenchmarkConfig, folder: Path) -> dict:
    """Materialise the real data once: test / val / train-pool lists, labels, split table."""
    images, boxes, names = load_dataset(cfg.dataset)
    test_split, train_split = canonical_split(cfg.test_split), canonical_split(cfg.train_split)
    if test_split not in set(images.split) or train_split not in set(images.split):
        raise SynthgenError(
            f"{cfg.dataset}: needs splits {cfg.train_split!r} and {cfg.test_split!r}, has {sorted(set(images.split))}"
        )
    images = images.assign(group=group_ids(images.image_path, cfg.group_pattern))
    test = images[images.split == test_split]
    pool = images[images.split == train_split]
    leaked = pool.group.isin(set(test.group))
    pool = pool[~leaked]  # a group present in test never trains anything
    side = split_by_group(pool, boxes, cfg.val_fraction, cfg.split_seed)
    table = pd.concat([test.assign(bench_split="test"), pool.assign(bench_split=side.to_numpy())])
    table = table.assign(split=table.bench_split)
    links = materialize(table, boxes, names, folder / "data")
    table = table.assign(link=table.image_path.map(links))
    table[["image_path", "link", "group", "bench_split", "width", "height"]].to_csv(folder / "split.csv", index=False)
    boxes[boxes.image_path.isin(set(table.image_path))].to_csv(folder / "boxes.csv", index=False)
    for s in ("test", "val", "train"):
        write_list(folder / f"{s}.txt", sorted(table.link[table.bench_split == s]))
    write_json(folder / "names.json", names)
    counts = table.bench_split.value_counts().to_dict()
    return {"names": names, "counts": counts, "leaked_groups_dropped": int(leaked.sum()),
            "groups": {s: int(table.group[table.bench_split == s].nunique()) for s in ("train", "val", "test")}}


def _predict(best: Path, images: list[str], imgsz: int, conf: float, device: str) -> pd.DataFrame:
    """Full-frame predictions on the test images (same letterbox as ultralytics' val)."""
    from ultralytics import YOLO

    from detection.train import _ultra_device, make_ultralytics_offline

    make_ultralytics_offline()
    model = YOLO(str(best))
    rows = []
    for i in range(0, len(images), 16):
        for r in model.predict(images[i : i + 16], imgsz=imgsz, conf=conf, max_det=300, verbose=False,
                               device=_ultra_device(device)):
            b = r.boxes
            for (x0, y0, x1, y1), s, c in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist(), strict=True):
                rows.append((r.path, x0, y0, x1, y1, r.names[int(c)], s))
    return pd.DataFrame(rows, columns=["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"])


class Benchmark:
    """One run of a config at one scale; `run()` returns the results dict written to results.json."""

    def __init__(self, cfg: BenchmarkConfig, scale: str, out: Path, work: Path, device: str = "auto",
                 progress: bool = True):
        self.cfg, self.scale_name, self.scale = cfg, scale, cfg.scale(scale)
        self.out, self.work, self.device, self.progress = Path(out), Path(work), device, progress
        self.cache = StageCache(self.work)

    # -- stages ---------------------------------------------------------------------------------
    def split(self) -> tuple[str, dict]:
        c = self.cfg
        key = stage_hash("split", c.dataset, c.test_split, c.train_split, c.val_fraction, c.group_pattern,
                         c.split_seed, sorted(str(p) for p in Path(c.dataset).rglob("*.txt")))
        return key, self.cache.run("split", key, lambda d: make_split(c, d))

    def subset(self, split_key: str, fraction: float, seed: int) -> tuple[str, Path]:
        key = stage_hash("subset", split_key, fraction, seed)
        name = f"cells/f{fraction:g}-s{seed}/subset"
        sdir = self.work / "split"

        def build(d: Path) -> dict:
            table = pd.read_csv(sdir / "split.csv")
            boxes = pd.read_csv(sdir / "boxes.csv")
            train = table[table.bench_split == "train"]
            picked = set(draw_fraction(train, boxes, fraction, seed))
            write_list(d / "train_real.txt", sorted(train.link[train.image_path.isin(picked)]))
            write_list(d / "train_real_source.txt", sorted(picked))  # original paths, for chips/compose
            return {"images": len(picked), "boxes": int(boxes.image_path.isin(picked).sum())}

        self.cache.run(name, key, build)
        return key, self.work / name / "train_real.txt"

    def synthetic_list(self, kind: str, sub_key: str, train_list: Path, fraction: float, seed: int) -> tuple[str, Path]:
        """copy_paste: compose the cell's real chips; synthgen: chips -> generator -> generate -> compose."""
        s, cell, c = self.scale, f"cells/f{fraction:g}-s{seed}", self.cfg
        source_list = train_list.with_name("train_real_source.txt")
        train_images = source_list.read_text().split()
        chips_key = stage_hash("chips", sub_key, s.chips, c.taxonomy)
        self.cache.run(f"{cell}/chips", chips_key, lambda d: {"dir": str(synthetic.chips(
            c.dataset, train_images, d, c.taxonomy, **s.chips))}, resumable=True)
        pool, pool_key = self.work / cell / "chips", chips_key
        if kind == "synthgen":
            gen_key = stage_hash("generator", chips_key, synthetic.generator_config(seed, **s.generator), seed)
            self.cache.run(f"{cell}/generator", gen_key,
                           lambda d: {"dir": str(synthetic.train_generator(pool, d, seed=seed, **s.generator))},
                           resumable=True)
            pool_key = stage_hash("generate", gen_key, s.generate, seed)
            self.cache.run(f"{cell}/generated", pool_key, lambda d: {"dir": str(synthetic.generate(
                self.work / cell / "generator", d, seed=seed, **s.generate))}, resumable=True)
            pool = self.work / cell / "generated"
            if s.filter is not None:
                pool_key = stage_hash("filter", pool_key, chips_key, synthetic.filter_config(seed, **s.filter), seed)
                self.cache.run(f"{cell}/filtered", pool_key, lambda d: {"dir": str(synthetic.filter_generated(
                    self.work / cell / "generated", self.work / cell / "chips", d, seed=seed, dataset=c.dataset,
                    train_images=train_images, **s.filter))},
                    resumable=True)
                pool = self.work / cell / "filtered" / "kept"
        key = stage_hash("compose", kind, pool_key, s.compose, s.synthetic_images, seed)
        self.cache.run(f"{cell}/compose-{kind}", key, lambda d: {"list": str(synthetic.compose(
            c.dataset, pool, source_list, d, n_images=s.synthetic_images, seed=seed, **s.compose))},
            resumable=True)
        return key, self.work / cell / f"compose-{kind}" / "train_synthetic.txt"

    def _data_yaml(self, folder: Path, train_real: Path, synth: Path | None = None, ratio: float | None = None,
                   name: str = "data.yaml") -> Path:
        import json

        names = json.loads((self.work / "split" / "names.json").read_text())
        return write_data_yaml(folder / name, names, train_real, self.work / "split" / "val.txt", synth, ratio)

    def detector(self, arm: str, key: str, folder: str, train_real: Path, synth: Path | None, ratio: float | None,
                 seed: int, init: Path | None = None) -> Path:
        det = self.scale.detector.model_copy(update={"seed": seed, "device": self.device})
        if init is not None:
            det = det.model_copy(update={"model": str(init)})
        dkey = stage_hash("detector", key, det.model_dump(exclude={"device", "workers"}), ratio, arm)

        def build(d: Path) -> dict:
            data = self._data_yaml(d, train_real, synth, ratio, name="input.yaml")
            cfg = DetectorTrainConfig(**(det.model_dump() | {"data": str(data)}))
            return {"best": str(train_detector(cfg, d / "yolo", verbose=False))}

        res = self.cache.run(folder, dkey, build, resumable=True)
        self._keys[folder] = dkey
        return Path(res["best"])

    def evaluate(self, folder: str, best: Path) -> dict:
        s = self.scale
        imgsz = s.eval_imgsz or s.detector.imgsz
        key = stage_hash("eval", self._keys[folder], imgsz, s.eval_conf, s.operating_conf)

        def build(d: Path) -> dict:
            sdir = self.work / "split"
            table = pd.read_csv(sdir / "split.csv")
            test = table[table.bench_split == "test"]
            gt = pd.read_csv(sdir / "boxes.csv")
            gt = gt[gt.image_path.isin(set(test.image_path))].assign(
                image_path=lambda g: g.image_path.map(dict(zip(test.image_path, test.link, strict=True))))
            pred = _predict(best, list(test.link), imgsz, s.eval_conf, self.device)
            pred.to_csv(d / "predictions.csv", index=False)
            return evaluate(gt, pred, images=list(test.link), names=self.split_info["names"],
                            conf=s.operating_conf).to_dict()

        return self.cache.run(f"{folder}/eval", key, build)

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from rich.progress import Progress

        self._keys: dict[str, str] = {}
        split_key, self.split_info = self.split()
        s: ScaleConfig = self.scale
        rows: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        cells = [(f, sd) for f in s.fractions for sd in s.seeds]
        with Progress(disable=not self.progress) as bar:
            task = bar.add_task(f"benchmark {self.cfg.name} [{self.scale_name}]", total=len(cells) * len(self.cfg.arms))
            for fraction, seed in cells:
                sub_key, train_real = self.subset(split_key, fraction, seed)
                synth: dict[str, tuple[str, Path] | None] = {}
                for kind in ("copy_paste", "synthgen"):
                    needed = {"copy_paste": ["copy_paste"], "synthgen": ["synthgen", "synth_only",
                                                                         "pretrain_finetune"]}[kind]
                    if not set(needed) & set(self.cfg.arms):
                        continue
                    try:
                        synth[kind] = self.synthetic_list(kind, sub_key, train_real, fraction, seed)
                    except synthetic.StageUnavailable as e:
                        synth[kind] = None
                        for a in needed:
                            skipped[a] = str(e)
                cell = f"cells/f{fraction:g}-s{seed}"
                for arm in self.cfg.arms:
                    bar.advance(task)
                    src = {"real": None, "copy_paste": "copy_paste"}.get(arm, "synthgen")
                    if src and synth.get(src) is None:
                        continue
                    skey, slist = synth[src] if src else ("", None)
                    ratio = {"real": None, "copy_paste": s.synthetic_ratio, "synthgen": s.synthetic_ratio,
                             "synth_only": 1.0, "pretrain_finetune": None}[arm]
                    init = None
                    if arm == "pretrain_finetune":  # fine-tune arm 4's synthetic-only model on the real subset
                        init = self.detector("synth_only", stage_hash(sub_key, skey), f"{cell}/synth_only",
                                             train_real, slist, 1.0, seed)
                        slist = None
                    best = self.detector(arm, stage_hash(sub_key, skey), f"{cell}/{arm}", train_real, slist,
                                         ratio, seed, init)
                    m = self.evaluate(f"{cell}/{arm}", best)
                    rows.append({"arm": arm, "fraction": fraction, "seed": seed, **m, "model": str(best)})
        examples = self._example_tiles()
        results = {
            "name": self.cfg.name, "scale": self.scale_name, "config": self.cfg.model_dump(mode="json"),
            "split": self.split_info, "runs": rows, "skipped_arms": skipped, "example_tiles": examples,
            "example_instances": self._example_instances(),
            "generators": self._generator_summary(),
            "stages": {"ran": len(self.cache.ran), "cached": len(self.cache.skipped)},
        }
        write_report(results, self.out)
        return results

    def _generator_summary(self) -> dict[str, dict]:
        """Per cell: generator steps and final loss, and how many generated instances the filter kept."""
        import json

        out: dict[str, dict] = {}
        for cell in sorted(self.work.glob("cells/*")):
            gen, filt = cell / "generator" / "synthgen_model.json", cell / "filtered" / "kept" / "filter_summary.json"
            if gen.is_file():
                g = json.loads(gen.read_text())
                out[cell.name] = {"steps": g.get("steps"), "final_loss": g.get("final_loss")}
                if filt.is_file():
                    f = json.loads(filt.read_text())
                    out[cell.name] |= {"generated": f["n"], "kept": f["kept"], "score": f["score"]}
        return out

    def _example_instances(self, n: int = 16) -> dict[str, list[str]]:
        """Real training chips, and generated chips the filter kept and rejected, of the first cell that
        has a generator: what the generator draws, beside what it learned from."""
        import json

        for cell in sorted(self.work.glob("cells/*")):
            gen = cell / "filtered" / "kept"
            if not (gen / "manifest.jsonl").is_file():
                gen = cell / "generated"
                if not (gen / "manifest.jsonl").is_file():
                    continue

            def files(folder: Path) -> list[str]:
                m = folder / "manifest.jsonl"
                rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()] if m.is_file() else []
                return [str(folder / r["file"]) for r in rows[:n]]

            real = sorted((cell / "chips" / "train").rglob("*.png"))[:n]
            return {"real training chips": [str(p) for p in real], "generated, kept": files(gen),
                    "generated, rejected by the filter": files(gen / "rejected")}
        return {}

    def _example_tiles(self, n: int = 6) -> list[str]:
        """A few composed synthgen training tiles for the report (first cell that has them)."""
        for lst in sorted(self.work.glob("cells/*/compose-synthgen/train_synthetic.txt")):
            return [p for p in lst.read_text().split() if p][:n]
        return []


def run_benchmark(cfg: BenchmarkConfig | str | Path, scale: str = "cpu", out: str | Path | None = None,
                  work: str | Path | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Run (or resume) a benchmark; report under `out` (default benchmarks/results/NAME), stage
    outputs under `work` (default runs/benchmarks/NAME/SCALE, outside results so the report stays small)."""
    if not isinstance(cfg, BenchmarkConfig):
        cfg = BenchmarkConfig.from_yaml(cfg)
    # absolute: ultralytics resolves list paths in a data.yaml against the yaml's own folder
    out = (Path(out) if out else Path("benchmarks/results") / cfg.name).resolve()
    work = (Path(work) if work else Path("runs/benchmarks") / cfg.name / scale).resolve()
    return Benchmark(cfg, scale, out, work, device, progress).run()


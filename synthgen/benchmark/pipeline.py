"""The benchmark pipeline: split -> per (fraction, seed) cell: subset, chips, generator, generate,
filter, compose -> detectors per arm -> evaluation on the real test split -> report.

Split protocol (documented in every report): the dataset's `test_split` (e.g. `valid`) is the
test set; it is real, and never seen by the generator, the judge or any detector. Images are grouped
by source frame (or source tile) from per-dataset file-name patterns; train images of a frame that
also gives test images are left out. The rest of `train` is divided by group into train and a
validation part for early stopping; real fractions are drawn from that train part by seed,
stratified by taxon. Further test sets (`tests`) are evaluated by every detector, never trained on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from detection.dataset import canonical_split
from detection.metrics import evaluate
from detection.train import DetectorTrainConfig, train_detector, write_data_yaml
from synthgen.benchmark import synthetic
from synthgen.benchmark.cache import StageCache, stage_hash
from synthgen.benchmark.config import BenchmarkConfig, ScaleConfig
from synthgen.benchmark.data import cut_windows, load_dataset, materialize, write_list
from synthgen.benchmark.power import image_flags, paired_interval
from synthgen.benchmark.report import write_report
from synthgen.benchmark.splits import draw_fraction, split_by_group, tile_and_frame_ids
from synthgen.errors import SynthgenError
from synthgen.io_utils import write_json
from synthgen.pool import MANIFEST, read_pool


def make_split(cfg: BenchmarkConfig, folder: Path) -> dict:
    """Materialise the real data once: test / val / train-pool lists, labels, split table.

    Groups are source frames (source tiles where a name carries no frame). Train images from a frame
    that also gives test images are left out of training: their neighbours would be tested on."""
    images, boxes, names = load_dataset(cfg.dataset)
    test_split, train_split = canonical_split(cfg.test_split), canonical_split(cfg.train_split)
    if test_split not in set(images.split) or train_split not in set(images.split):
        raise SynthgenError(
            f"{cfg.dataset}: needs splits {cfg.train_split!r} and {cfg.test_split!r}, has {sorted(set(images.split))}"
        )
    tiles, frames = tile_and_frame_ids(list(images.image_path), cfg.groups.tile, cfg.groups.frame)
    images = images.assign(tile=tiles, group=frames)
    test = images[images.split == test_split]
    pool = images[images.split == train_split]
    shared = pool.group.isin(set(test.group))
    source = {s: {"images": len(d), "tiles": int(d.tile.nunique()), "frames": int(d.group.nunique())}
              for s, d in (("train", pool), ("test", test))}
    leak = {"frames_shared": int(pool.group[shared].nunique()), "train_images_dropped": int(shared.sum()),
            "train_tiles_dropped": int(pool.tile[shared].nunique()),
            "tiles_shared": int(pool.tile.isin(set(test.tile)).sum())}
    pool = pool[~shared]
    side = split_by_group(pool, boxes, cfg.val_fraction, cfg.split_seed)
    table = pd.concat([test.assign(bench_split="test"), pool.assign(bench_split=side.to_numpy())])
    table = table.assign(split=table.bench_split)
    links = materialize(table, boxes, names, folder / "data")
    table = table.assign(link=table.image_path.map(links))
    table[["image_path", "link", "tile", "group", "bench_split", "width", "height"]].to_csv(
        folder / "split.csv", index=False)
    boxes[boxes.image_path.isin(set(table.image_path))].to_csv(folder / "boxes.csv", index=False)
    for s in ("test", "val", "train"):
        write_list(folder / f"{s}.txt", sorted(table.link[table.bench_split == s]))
    write_json(folder / "names.json", names)
    counts = table.bench_split.value_counts().to_dict()
    return {"names": names, "counts": counts, "source": source, "leak": leak,
            "groups": {s: int(table.group[table.bench_split == s].nunique()) for s in ("train", "val", "test")}}


def load_test_set(path: Path, folder: Path, split_dir: Path, groups) -> dict:
    """A further held-out dataset (every split of it): its table, boxes and how many of its images
    share a source tile or frame with any image the run trains or early-stops on."""
    images, boxes, _ = load_dataset(path)
    tiles, frames = tile_and_frame_ids(list(images.image_path), groups.tile, groups.frame)
    images = images.assign(tile=tiles, group=frames)
    train = pd.read_csv(split_dir / "split.csv")
    train = train[train.bench_split != "test"]
    same_tile = images.tile.isin(set(train.tile)) | images.image_path.isin(set(train.image_path))
    same_frame = images.group.isin(set(train.group))
    images[["image_path", "tile", "group"]].to_csv(folder / "test.csv", index=False)
    boxes.to_csv(folder / "boxes.csv", index=False)
    return {"path": str(path), "images": len(images), "boxes": len(boxes), "share_tile": int(same_tile.sum()),
            "share_frame": int(same_frame.sum())}


def _predict(best: Path, images: list[str], imgsz: int, conf: float, device: str) -> pd.DataFrame:
    """Full-frame predictions on the test images (same letterbox as ultralytics' val)."""
    from ultralytics import YOLO

    from detection.train import make_ultralytics_offline, ultralytics_device

    make_ultralytics_offline()
    model = YOLO(str(best))
    rows = []
    for i in range(0, len(images), 16):
        for r in model.predict(images[i : i + 16], imgsz=imgsz, conf=conf, max_det=300, verbose=False,
                               device=ultralytics_device(device)):
            b = r.boxes
            for (x0, y0, x1, y1), s, c in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist(), strict=True):
                rows.append((r.path, x0, y0, x1, y1, r.names[int(c)], s))
    return pd.DataFrame(rows, columns=["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"])


# which synthetic image list each arm trains on (None: real only)
ARM_SOURCE = {"real": None, "real_long": None, "copy_paste": "copy_paste", "incontext": "incontext",
              "synthgen": "synthgen", "synth_only": "synthgen", "pretrain_finetune": "synthgen"}


def _lines(path: Path | None) -> int:
    return len(path.read_text().split()) if path else 0


class Benchmark:
    """One run of a config at one scale; `run()` returns the results dict written to results.json.

    `tests` (name -> dataset) are further held-out sets: every detector of the run is evaluated on
    them too; the detectors are cached stages, so adding a test set later only evaluates."""

    def __init__(self, cfg: BenchmarkConfig, scale: str, out: Path, work: Path, device: str = "auto",
                 progress: bool = True, tests: dict[str, str | Path] | None = None):
        self.cfg, self.scale_name, self.scale = cfg, scale, cfg.scale(scale)
        self.out, self.work, self.device, self.progress = Path(out), Path(work), device, progress
        self.tests = {k: Path(v).resolve() for k, v in (tests or {}).items()}
        bad = [k for k in self.tests if k == "test" or not k.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise SynthgenError(f"--test {bad[0]}=...: a test set name is letters, digits, - and _, not 'test'")
        self.cache = StageCache(self.work)
        self._keys: dict[str, str] = {}

    # -- stages ---------------------------------------------------------------------------------
    def split(self) -> tuple[str, dict]:
        c = self.cfg
        key = stage_hash("split", c.dataset, c.test_split, c.train_split, c.val_fraction, c.groups,
                         c.split_seed, sorted(str(p) for p in Path(c.dataset).rglob("*.txt")))
        return key, self.cache.run("split", key, lambda d: make_split(c, d))

    def windows(self, split_key: str) -> str:
        """Native scale: the validation tiles cut into windows once (each cell cuts its own train tiles)."""
        n = self.scale.native
        key = stage_hash("windows", split_key, n, self.scale.max_eval_images)

        def build(d: Path) -> dict:
            val = self._limit(list(pd.read_csv(self.work / "split" / "val.txt", header=None)[0]))
            index = cut_windows(val, d, n.window, n.overlap, n.min_visible)
            write_list(d / "val.txt", [w for v in index.values() for w in v])
            return {"windows": sum(len(v) for v in index.values())}

        self.cache.run("windows", key, build)
        return key

    def _limit(self, images: list[str]) -> list[str]:
        """The first `max_eval_images` (smoke runs only; None keeps all)."""
        return images[: self.scale.max_eval_images] if self.scale.max_eval_images else images

    def val_list(self) -> Path:
        return self.work / ("windows" if self.scale.native else "split") / "val.txt"

    def subset(self, split_key: str, fraction: float, seed: int) -> tuple[str, Path]:
        """The cell's real training images; returns the list the detectors train on (windows at native scale)."""
        n = self.scale.native
        key = stage_hash("subset", split_key, fraction, seed, n)
        name = f"cells/f{fraction:g}-s{seed}/subset"
        sdir = self.work / "split"

        def build(d: Path) -> dict:
            table = pd.read_csv(sdir / "split.csv")
            boxes = pd.read_csv(sdir / "boxes.csv")
            train = table[table.bench_split == "train"]
            picked = set(draw_fraction(train, boxes, fraction, seed))
            links = sorted(train.link[train.image_path.isin(picked)])
            write_list(d / "train_real.txt", links)
            write_list(d / "train_real_source.txt", sorted(picked))  # original paths, for chips/compose
            if n:
                index = cut_windows(links, d / "windows", n.window, n.overlap, n.min_visible)
                write_list(d / "train_windows.txt", [w for v in index.values() for w in v])
            return {"images": len(picked), "boxes": int(boxes.image_path.isin(picked).sum())}

        self.cache.run(name, key, build)
        return key, self.work / name / ("train_windows.txt" if n else "train_real.txt")

    def synthetic_list(self, kind: str, sub_key: str, fraction: float, seed: int) -> tuple[str, Path]:
        """copy_paste: compose the cell's real chips; synthgen: chips -> generator -> generate -> filter ->
        compose; incontext: tiles painted by the configured in-context generator."""
        s, cell, c, pg = self.scale, f"cells/f{fraction:g}-s{seed}", self.cfg, self.progress
        source_list = self.work / cell / "subset" / "train_real_source.txt"
        train_images = source_list.read_text().split()
        if kind == "incontext":
            model = c.arms.incontext.model
            key = stage_hash("paint", sub_key, model, s.compose, s.synthetic_images, seed)
            self.cache.run(f"{cell}/compose-{kind}", key, lambda d: {"list": str(synthetic.paint(
                c.dataset, model, source_list, d, n_images=s.synthetic_images, seed=seed, **s.compose))},
                resumable=True)
            return self._windowed(kind, key, cell)
        chips_key = stage_hash("chips", sub_key, s.chips, c.taxonomy)
        self.cache.run(f"{cell}/chips", chips_key, lambda d: {"dir": str(synthetic.chips(
            c.dataset, train_images, d, c.taxonomy, progress=pg, **s.chips))}, resumable=True)
        pool, pool_key = self.work / cell / "chips", chips_key
        if kind == "synthgen":
            gen_key = stage_hash("generator", chips_key, synthetic.generator_config(seed, **s.generator), seed)
            self.cache.run(f"{cell}/generator", gen_key, lambda d: {"dir": str(synthetic.train_generator(
                pool, d, seed=seed, progress=pg, **s.generator))}, resumable=True)
            pool_key = stage_hash("generate", gen_key, s.generate, seed)
            self.cache.run(f"{cell}/generated", pool_key, lambda d: {"dir": str(synthetic.generate(
                self.work / cell / "generator", d, seed=seed, progress=pg, **s.generate))}, resumable=True)
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
        return self._windowed(kind, key, cell)

    def _windowed(self, kind: str, key: str, cell: str) -> tuple[str, Path]:
        """The composed tiles' list, cut into windows at native scale."""
        lst = self.work / cell / f"compose-{kind}" / "train_synthetic.txt"
        n = self.scale.native
        if n is None:
            return key, lst
        wkey = stage_hash("windows", key, n)

        def build(d: Path) -> dict:
            index = cut_windows(lst.read_text().split(), d, n.window, n.overlap, n.min_visible)
            write_list(d / "train_synthetic.txt", [w for v in index.values() for w in v])
            return {"windows": sum(len(v) for v in index.values())}

        self.cache.run(f"{cell}/windows-{kind}", wkey, build)
        return wkey, self.work / cell / f"windows-{kind}" / "train_synthetic.txt"

    def detector(self, arm: str, key: str, folder: str, train_real: Path, synth: Path | None, ratio: float | None,
                 seed: int, init: Path | None = None, epochs: int | None = None,
                 overrides: dict | None = None) -> Path:
        det = self.scale.detector.model_copy(update={"seed": seed, "device": self.device})
        if init is not None:
            det = det.model_copy(update={"model": str(init)})
        if epochs is not None:
            det = det.model_copy(update={"epochs": epochs, "patience": max(det.patience, epochs)})
        if overrides:
            det = det.model_copy(update={"overrides": det.overrides | overrides})
        dkey = stage_hash("detector", key, det.model_dump(exclude={"device", "workers"}), ratio, arm)

        def build(d: Path) -> dict:
            names = json.loads((self.work / "split" / "names.json").read_text())
            data = write_data_yaml(d / "input.yaml", names, train_real, self.val_list(), synth, ratio)
            cfg = DetectorTrainConfig(**(det.model_dump() | {"data": str(data)}))
            return {"best": str(train_detector(cfg, d / "yolo", verbose=self.progress))}

        res = self.cache.run(folder, dkey, build, resumable=True)
        self._keys[folder] = dkey
        return Path(res["best"])

    def predictions(self, model: Path, images: list[str]) -> pd.DataFrame:
        """Predictions on whole test images: sliced at the training window (native scale), else resized."""
        s = self.scale
        if s.native is None:
            return _predict(model, images, s.eval_imgsz or s.detector.imgsz, s.eval_conf, self.device)
        from detection.infer import SliceConfig, load_model, open_frame, predict_frame
        from synthgen.device import resolve_device

        dev = resolve_device(self.device)
        det = load_model(model, dev)
        cfg = SliceConfig(tile=s.native.window, overlap=s.native.slice_overlap, conf=s.eval_conf)
        frames = [predict_frame(det, open_frame(Path(p)), cfg, dev).assign(image_path=p) for p in images]
        return pd.concat(frames, ignore_index=True)

    def test_set(self, name: str, split_key: str) -> tuple[str, list[str], pd.DataFrame]:
        """(key, image paths, GT boxes) of the built-in test split or of a further test set."""
        if name == "test":
            sdir = self.work / "split"
            table = pd.read_csv(sdir / "split.csv")
            images = self._limit(list(table.image_path[table.bench_split == "test"]))
            return stage_hash(split_key, self.scale.max_eval_images), images, pd.read_csv(sdir / "boxes.csv")
        path = self.tests[name]
        root = path if path.is_dir() else path.parent
        key = stage_hash("testset", str(path), sorted(str(p) for p in root.rglob("*.txt")), split_key, self.cfg.groups)
        self.further[name] = self.cache.run(f"tests/{name}", key, lambda d: load_test_set(
            path, d, self.work / "split", self.cfg.groups))
        d = self.work / "tests" / name
        return key, list(pd.read_csv(d / "test.csv").image_path), pd.read_csv(d / "boxes.csv")

    def evaluate(self, folder: str, best: Path, test: str, tkey: str, images: list[str], gt: pd.DataFrame) -> dict:
        s = self.scale
        key = stage_hash("eval", self._keys[folder], tkey, s.eval_imgsz, s.eval_conf, s.operating_conf, s.native)

        def build(d: Path) -> dict:
            pred = self.predictions(best, images)
            pred.to_csv(d / "predictions.csv", index=False)
            return evaluate(gt, pred, images=images, names=self.split_info["names"],
                            conf=s.operating_conf).to_dict()

        return self.cache.run(f"{folder}/eval-{test}", key, build)

    # -- driver ---------------------------------------------------------------------------------
    def prepare(self) -> str:
        """Split (and windows at native scale); returns the key every cell builds on."""
        split_key, self.split_info = self.split()
        return self.windows(split_key) if self.scale.native else split_key

    def run(self) -> dict:
        from rich.progress import Progress

        s: ScaleConfig = self.scale
        arms = self.cfg.arms.enabled()
        rows: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        self.further: dict[str, dict] = {}
        cells = [(f, sd) for f in s.fractions for sd in s.seeds]
        with Progress(disable=not self.progress) as bar:
            self.cache.log = bar.console.print if self.progress else None
            base_key = self.prepare()
            tests = {t: self.test_set(t, base_key) for t in ["test", *self.tests]}
            task = bar.add_task(f"benchmark {self.cfg.name} [{self.scale_name}]", total=len(cells) * len(arms))
            for fraction, seed in cells:
                sub_key, train_real = self.subset(base_key, fraction, seed)
                synth: dict[str, tuple[str, Path] | None] = {}
                for kind in dict.fromkeys(ARM_SOURCE[a] for a in arms if ARM_SOURCE[a]):
                    try:
                        synth[kind] = self.synthetic_list(kind, sub_key, fraction, seed)
                    except synthetic.StageUnavailable as e:
                        synth[kind] = None
                        skipped.update({a: str(e) for a in arms if ARM_SOURCE[a] == kind})
                for arm in arms:
                    bar.advance(task)
                    src = ARM_SOURCE[arm]
                    if src and synth.get(src) is None:
                        continue
                    m = self._arm(arm, f"cells/f{fraction:g}-s{seed}", sub_key, train_real, synth.get(src), seed)
                    for t, (tkey, images, gt) in tests.items():
                        res = self.evaluate(m["folder"], m["best"], t, tkey, images, gt)
                        rows.append({"test": t, "arm": arm, "fraction": fraction, "seed": seed, **res,
                                     "optimizer_steps": m["steps"], "model": str(m["best"])})
        results = {
            "name": self.cfg.name, "scale": self.scale_name, "config": self.cfg.model_dump(mode="json"),
            "split": self.split_info, "runs": [r for r in rows if r["test"] == "test"],
            "further_tests": {t: {"info": self.further[t], "runs": [r for r in rows if r["test"] == t]}
                              for t in self.tests},
            "intervals": self._intervals(rows, tests), "skipped_arms": skipped,
            "example_tiles": self._example_tiles(), "example_instances": self._example_instances(),
            "generators": self._generator_summary(),
            "stages": {"ran": len(self.cache.ran), "cached": len(self.cache.skipped)},
            "stage_seconds": dict(self.cache.seconds), "out": str(self.out / "report.md"),
        }
        write_report(results, self.out)
        return results

    def _arm(self, arm: str, cell: str, sub_key: str, train_real: Path, synth: tuple[str, Path] | None,
             seed: int) -> dict:
        """Train (or reuse) one arm's detector; returns its folder, weights and optimizer steps."""
        s, a = self.scale, self.cfg.arms
        skey, slist = synth or ("", None)
        b, e = s.detector.batch, s.detector.epochs
        real_batches = math.ceil(_lines(train_real) / b)
        key = stage_hash(sub_key, skey)
        if arm in ("real", "real_long"):
            ft = (a.pretrain_finetune.finetune_epochs if a.pretrain_finetune else None) or e
            pre_steps = e * math.ceil(self._synth_windows(cell) / b)  # arm 4's steps (its epoch = the synthetic pool)
            epochs = None if arm == "real" else max(1, round((pre_steps + ft * real_batches) / real_batches))
            best = self.detector(arm, sub_key, f"{cell}/{arm}", train_real, None, None, seed, epochs=epochs)
            return {"folder": f"{cell}/{arm}", "best": best, "steps": (epochs or e) * real_batches}
        if arm == "pretrain_finetune":
            init = self.detector("synth_only", key, f"{cell}/synth_only", train_real, slist, 1.0, seed)
            ft = a.pretrain_finetune.finetune_epochs or e
            best = self.detector(arm, key, f"{cell}/{arm}", train_real, None, None, seed, init, epochs=ft)
            return {"folder": f"{cell}/{arm}", "best": best,
                    "steps": e * math.ceil(_lines(slist) / b) + ft * real_batches}
        if arm == "synth_only":
            best = self.detector(arm, key, f"{cell}/{arm}", train_real, slist, 1.0, seed)
            return {"folder": f"{cell}/{arm}", "best": best, "steps": e * math.ceil(_lines(slist) / b)}
        ratio = getattr(a, arm).synthetic_ratio
        ratio = s.synthetic_ratio if ratio is None else ratio
        best = self.detector(arm, key, f"{cell}/{arm}", train_real, slist, ratio, seed)
        n = _lines(train_real) if s.detector.synthetic_epoch == "match_real" else math.ceil(_lines(train_real) /
                                                                                           max(1 - ratio, 1e-9))
        return {"folder": f"{cell}/{arm}", "best": best, "steps": e * math.ceil(n / b)}

    def _synth_windows(self, cell: str) -> int:
        """Size of the cell's synthgen training list (0 when no synthgen arm ran)."""
        name = "windows-synthgen" if self.scale.native else "compose-synthgen"
        return _lines(p) if (p := self.work / cell / name / "train_synthetic.txt").is_file() else 0

    def _intervals(self, rows: list[dict], tests: dict) -> list[dict]:
        """Paired mAP50 differences against real-only with bootstrap intervals, per test set, arm, fraction."""
        out = []
        names = self.split_info["names"]
        for t, (_, images, gt) in tests.items():
            flags: dict[tuple[str, float], dict[int, Any]] = {}
            for r in rows:
                if r["test"] != t:
                    continue
                cell = f"cells/f{r['fraction']:g}-s{r['seed']}/{r['arm']}"
                pred = pd.read_csv(self.work / cell / f"eval-{t}" / "predictions.csv")
                flags.setdefault((r["arm"], r["fraction"]), {})[r["seed"]] = image_flags(gt, pred, images, names)
            for (arm, fraction), f in sorted(flags.items()):
                if arm == "real" or ("real", fraction) not in flags:
                    continue
                ci = paired_interval(f, flags[("real", fraction)], len(images), self.scale.bootstrap)
                out.append({"test": t, "arm": arm, "fraction": fraction, **ci})
        return out

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
        for cell in sorted(self.work.glob("cells/*")):
            gen = cell / "filtered" / "kept"
            if not (gen / MANIFEST).is_file():
                gen = cell / "generated"
                if not (gen / MANIFEST).is_file():
                    continue

            def files(folder: Path) -> list[str]:
                rows = read_pool(folder) if (folder / MANIFEST).is_file() else []
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
                  work: str | Path | None = None, device: str = "auto", progress: bool = True,
                  tests: dict[str, str | Path] | None = None) -> dict:
    """Run (or resume) a benchmark. Stage outputs go under `work` (default runs/benchmarks/NAME/SCALE)
    and the report under `out` (default WORK/report: the committed reports under benchmarks/results/
    are written only when asked for by an explicit `out`)."""
    return make_benchmark(cfg, scale, out, work, device, progress, tests, "report").run()


def make_benchmark(cfg: BenchmarkConfig | str | Path, scale: str, out: str | Path | None, work: str | Path | None,
                   device: str = "auto", progress: bool = True, tests: dict[str, str | Path] | None = None,
                   default_out: str = "report") -> Benchmark:
    """A Benchmark with the default folders: work runs/benchmarks/NAME/SCALE, out WORK/`default_out`."""
    if not isinstance(cfg, BenchmarkConfig):
        cfg = BenchmarkConfig.from_yaml(cfg)
    # absolute: ultralytics resolves list paths in a data.yaml against the yaml's own folder
    work = (Path(work) if work else Path("runs/benchmarks") / cfg.name / scale).resolve()
    out = (Path(out) if out else work / default_out).resolve()
    return Benchmark(cfg, scale, out, work, device, progress, tests)

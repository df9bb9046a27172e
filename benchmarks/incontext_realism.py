"""Issue 17's figures: can a classifier tell painted animals from real ones on held-out tiles, and
does the real-data judge accept them?

Real: every labelled animal of the held-out split, in the window the generator would use for it
(centred on the hole, moved inside the tile). Painted: animals painted at new places on the same
held-out tiles, never over a labelled one, with sizes from the training labels (taxa drawn evenly
for a model with several). Copy-paste: real training animals of the same label warped onto the same
new places with their own surroundings (today's cheap route). Each is compared with the real windows
by a two-sample classifier (logistic regression, 5-fold, on ImageNet EfficientNet-Lite0 features),
FD, KID and precision/recall, beside the real-vs-real floor. With `--judge`, each instance is also
cut as the judge's chips are cut and scored: `p_animal` against the calibrated bar (the 10th
percentile on the real held-out instances, as `synthgen filter`'s calibrated mode sets it) and,
per taxon, whether the judge names the right taxon, against its accuracy on the real ones.
Writes JSON + markdown, a sheet of 64 painted vs 64 real windows and previews of painted tiles.

    python benchmarks/incontext_realism.py --model models/glacierbay-seals-incontext \
        --habitat configs/compose/glacierbay-seals.yaml --judge runs/eyes/judge/seals-3min/pretrained \
        --out benchmarks/results/incontext_seals_ice
    python benchmarks/incontext_realism.py --model runs/aquarium-incontext --data ../shared/data/aquarium/data.yaml \
        --placement anywhere --view ground --judge runs/eyes/judge/aquarium/pretrained --out runs/ic-aquarium
    python benchmarks/incontext_realism.py --checkpoint runs/seals-incontext/checkpoints/step-0002000 \\
        --config configs/train/seals-incontext.yaml --out runs/ic-eval-2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from detection import read_dataset
from synthgen.compose.config import ComposeConfig
from synthgen.compose.placement import color_habitat
from synthgen.incontext.generator import InContextGenerator, PaintConfig, Placement, sample_placements
from synthgen.incontext.shapes import corners_of
from synthgen.incontext.windows import grow, on_tile, one_per_group
from synthgen.io_utils import atomic_save_image, write_json
from synthgen.metrics.realism import realism


def load_tiles(data: str, split: str, group_pattern: str | None):
    """(path, RGB array, [corners]) per image of `split`, one per source group."""
    ds = read_dataset(data)
    ds = ds.subset(split)
    tiles = []
    for p in one_per_group(list(ds.images.image_path), group_pattern):
        rgb = cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        boxes = ds.boxes[ds.boxes.image_path == p]
        tiles.append((p, rgb, [corners_of(b) for b in boxes.itertuples()], list(boxes.label)))
    return tiles


def shifted_proposer(corners: list[np.ndarray]):
    """Candidates beside the tile's labelled seals: a seal's box moved 1-2.5 of its lengths in a random
    direction and turned at random. The surroundings stay those seals choose (haul-out ice), so the
    classifier compares animals, not ice with open water."""
    from synthgen.incontext.generator import oriented_box

    def propose(rng: np.random.Generator) -> np.ndarray:
        c = corners[int(rng.integers(len(corners)))]
        a, b = float(np.linalg.norm(c[1] - c[0])), float(np.linalg.norm(c[2] - c[1]))
        long, short = max(a, b), min(a, b)
        theta = rng.uniform(0, 2 * np.pi)
        centre = c.mean(0) + rng.uniform(1.0, 2.5) * long * np.array([np.cos(theta), np.sin(theta)])
        return oriented_box(tuple(centre), long, short, rng.uniform(0, np.pi))

    return propose


def copy_paste(tile: np.ndarray, target: np.ndarray, source_tile: np.ndarray, source: np.ndarray, margin: float
               ) -> np.ndarray:
    """`tile` with the grown box of a real seal (`source` corners in `source_tile`) warped onto the grown
    box `target`: the animal arrives with its own surroundings, as cut-and-paste does."""
    s, t = grow(source, margin).astype(np.float32), grow(target, margin).astype(np.float32)
    m = cv2.getAffineTransform(s[:3], t[:3])
    h, w = tile.shape[:2]
    warped = cv2.warpAffine(source_tile, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(t).astype(np.int32)], 1)
    return np.where(mask[..., None].astype(bool), warped, tile)


def sheet(images: list[np.ndarray], cols: int, scale: int, title: str) -> Image.Image:
    s = images[0].shape[0] * scale
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * s, rows * s + 18), "white")
    ImageDraw.Draw(out).text((4, 3), title, fill="black")
    for i, im in enumerate(images):
        out.paste(Image.fromarray(im).resize((s, s), Image.NEAREST), ((i % cols) * s, (i // cols) * s + 18))
    return out


def ground_proposer(donors: list[tuple[np.ndarray, np.ndarray]], tile_wh: tuple[int, int]):
    """Candidates for ground views: a real training box of the taxon, upright, its width and height kept
    (scaled to this tile's width), at its own relative row (so the perspective of the labels holds) and
    a uniform column."""
    from synthgen.incontext.generator import oriented_box

    def propose(rng: np.random.Generator) -> np.ndarray:
        rgb, c = donors[int(rng.integers(len(donors)))]
        (x0, y0), (x1, y1) = c.min(0), c.max(0)
        k = tile_wh[0] / rgb.shape[1]
        row = ((y0 + y1) / 2 / rgb.shape[0] + rng.normal(0, 0.05)) * tile_wh[1]
        return oriented_box((rng.uniform(0, tile_wh[0]), row), (x1 - x0) * k, (y1 - y0) * k, 0.0)

    return propose


def grey_fill(tile: np.ndarray, corners: np.ndarray, margin: float) -> np.ndarray:
    """`tile` with the grown hole at `corners` filled by the mean colour around it: an empty hole."""
    h, w = tile.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(grow(corners, margin)).astype(np.int32)], 1)
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    pad = max(x1 - x0, y1 - y0)
    sl = (slice(max(y0 - pad, 0), y1 + pad), slice(max(x0 - pad, 0), x1 + pad))
    ring = tile[sl][mask[sl] == 0]
    out = tile.copy()
    out[mask > 0] = ring.mean(0).astype(np.uint8) if len(ring) else 128
    return out


class JudgeCheck:
    """The real-data judge on judge-style chips of instances: p_animal and whether it names the taxon."""

    def __init__(self, folder: str):
        from synthgen.scoring.judge import JudgeScorer

        self.scorer = JudgeScorer(folder, device="cpu")
        chips = json.loads((Path(folder) / "judge.json").read_text())["chips"]
        self.chip = json.loads((Path(chips) / "chips.json").read_text())

    def chip_of(self, tile: np.ndarray, corners: np.ndarray) -> Image.Image:
        from detection.chips import cut_chip

        x0, y0 = corners.min(0)
        x1, y1 = corners.max(0)
        h, w = tile.shape[:2]
        box = (max(float(x0), 0.0), max(float(y0), 0.0), min(float(x1), w), min(float(y1), h))
        return Image.fromarray(cut_chip(tile, box, self.chip["size"], self.chip["margin"], self.chip["pad"]))

    def score(self, chips: list[Image.Image], taxa: list[str]) -> dict:
        """Per chip: p_animal (None for a judge without background chips) and taxon right."""
        space = self.scorer.space
        emb = self.scorer.embed_images(chips)
        probs = self.scorer.level_probs(emb)
        pred = np.stack([probs[lv].argmax(1) for lv in space.levels], 1)
        codes = np.array([space.encode(t) for t in taxa])
        right = ((pred == codes) | (codes == 0)).all(1)
        p_animal = self.scorer.extra_scores(emb, taxa).get("p_animal")
        return {"right": right, "p_animal": p_animal}


def judge_summary(real: dict, routes: dict[str, dict], taxa: dict[str, list[str]], percentile: float) -> dict:
    """Acceptance above the calibrated p_animal bar and per-taxon accuracy, each route beside the real."""
    out: dict = {"percentile": percentile}
    if real["p_animal"] is not None:
        bar = float(np.percentile(real["p_animal"], percentile))
        out["p_animal_bar"] = bar
        out["accepted"] = {k: float((v["p_animal"] >= bar).mean()) for k, v in {"real": real, **routes}.items()}
    per_taxon: dict = {}
    for t in sorted(set(taxa["real"])):
        row = {}
        for name, res in {"real": real, **routes}.items():
            m = np.asarray(taxa[name]) == t
            row[name] = {"accuracy": float(res["right"][m].mean()) if m.any() else None, "n": int(m.sum())}
        per_taxon[t] = row
    out["per_taxon"] = per_taxon
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="in-context model folder")
    ap.add_argument("--checkpoint", help="or a checkpoints/step-N folder (with --config)")
    ap.add_argument("--config", help="the run's train config (with --checkpoint)")
    ap.add_argument("--raw", action="store_true", help="with --checkpoint: raw weights instead of EMA")
    ap.add_argument("--data", default="../shared/data/glacierbay-seals/data.yaml")
    ap.add_argument("--split", default="val", help="held-out split (never trained on)")
    ap.add_argument("--train-split", default="train", help="where copy-paste takes its real animals")
    ap.add_argument("--per-tile", type=int, default=3)
    ap.add_argument("--max-tiles", type=int, help="a seeded sample of this many held-out tiles (quicker comparisons)")
    ap.add_argument("--habitat", help="compose config whose colour habitat rule the shifted places must meet "
                    "(e.g. configs/compose/glacierbay-seals.yaml: seals on ice)")
    ap.add_argument("--placement", choices=["shifted", "anywhere"], default="shifted",
                    help="shifted: beside the tile's labelled animals; anywhere: uniform over the tile")
    ap.add_argument("--view", choices=["nadir", "ground"], default="nadir",
                    help="ground: upright animals with the width, height and row of real training boxes")
    ap.add_argument("--judge", help="a judge folder (synthgen train-judge): p_animal and taxon checks")
    ap.add_argument("--percentile", type=float, default=10.0, help="calibrated bar: this percentile of real")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=1.5, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.checkpoint:
        gen = InContextGenerator.from_checkpoint(args.checkpoint, args.config, ema=not args.raw, device="cpu")
    else:
        gen = InContextGenerator.from_pretrained(args.model, device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pattern = gen.window.group_pattern
    tiles = load_tiles(args.data, args.split, pattern)
    if args.max_tiles and args.max_tiles < len(tiles):
        keep = np.random.default_rng(args.seed).choice(len(tiles), args.max_tiles, replace=False)
        tiles = [tiles[i] for i in sorted(keep)]
    donors = load_tiles(args.data, args.train_split, pattern)
    labels = sorted(gen.shapes)
    donor_animals = {lab: [(rgb, c) for _, rgb, cs, ls in donors for c, lab2 in zip(cs, ls, strict=True) if lab2 == lab]
                     for lab in labels}
    if args.model:
        counts = json.loads((Path(args.model) / "taxon_counts.json").read_text())
        target = {d["label"]: (taxon, d["lineage"]) for taxon, d in counts.items()}
    else:
        target = {lab: _lineage_from_config(args.config, lab) for lab in labels}
    rng = np.random.default_rng(args.seed)
    hcfg = ComposeConfig.from_yaml(args.habitat).habitat if args.habitat else None
    cfg = PaintConfig(steps=args.steps, guidance={"mode": "cfg", "scale": args.scale}, seed=args.seed)
    judge = JudgeCheck(args.judge) if args.judge else None

    routes = ("painted", "copy_paste", "grey_hole")
    real: list[np.ndarray] = []
    windows: dict[str, list[np.ndarray]] = {r: [] for r in routes}
    chips: dict[str, list[Image.Image]] = {r: [] for r in ("real", *routes)}
    taxa: dict[str, list[str]] = {r: [] for r in ("real", *routes)}
    previews = []
    paint_seconds, painted_tiles, turn = 0.0, 0, 0
    for k, (_path, rgb, corners, tile_labels) in enumerate(tiles):
        h, w = rgb.shape[:2]
        for c, lab in zip(corners, tile_labels, strict=True):  # real animals in the generator's window
            if on_tile(grow(c, gen.window.margin), (w, h)) and lab in target:
                real.append(gen.cut(rgb, c)[0])
                if judge:
                    chips["real"].append(judge.chip_of(rgb, c))
                    taxa["real"].append(target[lab][0])
        habitat = color_habitat(rgb, hcfg) > 0 if hcfg is not None else None
        places, place_labels = [], []
        for _ in range(args.per_tile):  # taxa in turn, so each gets its share
            lab = labels[turn % len(labels)]
            if args.placement == "shifted":
                if not corners:
                    break
                propose = shifted_proposer(corners)
            else:
                propose = ground_proposer(donor_animals[lab], (w, h)) if args.view == "ground" else None
            got = sample_placements((w, h), corners + places, gen.shapes[lab], 1, gen.window.margin, rng, 300,
                                    propose, habitat, hcfg.min_fraction if hcfg is not None else 0.0)
            if got:
                places += got
                place_labels.append(lab)
                turn += 1
        if not places:
            continue
        placements = [Placement(c, target[lab][0], lab, target[lab][1], seed=args.seed * 100003 + k * 101 + i)
                      for i, (c, lab) in enumerate(zip(places, place_labels, strict=True))]
        ts = time.time()
        painted_tile, _ = gen.paint_tile(rgb, placements, cfg)
        paint_seconds += time.time() - ts
        painted_tiles += 1
        pasted_tile, grey_tile = rgb, rgb
        for c, lab in zip(places, place_labels, strict=True):
            d_rgb, d_c = donor_animals[lab][int(rng.integers(len(donor_animals[lab])))]
            pasted_tile = copy_paste(pasted_tile, c, d_rgb, d_c, gen.window.margin)
            grey_tile = grey_fill(grey_tile, c, gen.window.margin)
        for c, lab in zip(places, place_labels, strict=True):
            for name, t in (("painted", painted_tile), ("copy_paste", pasted_tile), ("grey_hole", grey_tile)):
                windows[name].append(gen.cut(t, c)[0])
                if judge:
                    chips[name].append(judge.chip_of(t, c))
                    taxa[name].append(target[lab][0])
        if len(previews) < 4 and len(places) >= 2:
            previews.append((painted_tile, places))

    def pil(xs):
        return [Image.fromarray(x) for x in xs]

    painted = windows["painted"]
    results = {"real_windows": len(real), "painted_windows": len(painted), "tiles": len(tiles),
               "model": args.model or args.checkpoint, "ema": not args.raw, "steps": args.steps, "scale": args.scale,
               "paint_tiles_per_s": painted_tiles / paint_seconds if paint_seconds else None,
               "instances_per_tile": args.per_tile, "placement": args.placement, "view": args.view,
               "habitat": args.habitat, "judge": args.judge}
    for name in routes:
        r = realism(pil(real), pil(windows[name]), seed=args.seed, floor=name == "painted")
        results[name] = r["generated"]
        if r["floor"] is not None:
            results["floor"] = r["floor"]
        results["features"] = r["features"]
    if judge:
        scored = {name: judge.score(chips[name], taxa[name]) for name in chips}
        results["judge_checks"] = judge_summary(scored.pop("real"), scored, taxa, args.percentile)
    results["seconds"] = time.time() - t0
    write_json(out / "results.json", results)
    (out / "report.md").write_text(report(results, args, len(real), len(painted)), encoding="utf-8")

    n = min(64, len(painted), len(real))
    pick = np.random.default_rng(args.seed).choice(len(real), n, replace=False)
    atomic_save_image(sheet(painted[:n], 8, 3, f"painted (held-out tiles, new places): first {n}"), out / "sheet_painted.png")
    atomic_save_image(sheet([real[i] for i in pick], 8, 3, f"real held-out animals: {n} at random"), out / "sheet_real.png")
    atomic_save_image(sheet(windows["copy_paste"][:n], 8, 3, f"copy-paste of real training animals: first {n}"),
                      out / "sheet_copy_paste.png")
    for i, (tile, places) in enumerate(previews):
        im = Image.fromarray(tile)
        im.save(out / f"tile_{i}.jpg", quality=92)
        d = ImageDraw.Draw(im)
        for c in places:
            d.polygon([tuple(p) for p in grow(c, gen.window.margin).tolist()], outline=(255, 0, 0))
        im.save(out / f"tile_{i}_holes.jpg", quality=92)
    print(f"realism: painted {results['painted']['two_sample']['accuracy']:.3f}, copy-paste "
          f"{results['copy_paste']['two_sample']['accuracy']:.3f}, floor {results['floor']['two_sample']['accuracy']:.3f} "
          f"-> {out / 'report.md'}")


def report(results: dict, args, n_real: int, n_painted: int) -> str:
    lines = [f"# In-context painting: realism on held-out tiles ({results['model']})", "",
             f"{n_real} real animal windows of the `{args.split}` split of `{args.data}` against {n_painted} painted at "
             f"new places on the same tiles ({args.per_tile} per tile, placement `{args.placement}`, view `{args.view}`"
             f"{f', habitat rule of `{args.habitat}`' if args.habitat else ''}); {args.steps} DDIM steps, CFG {args.scale}; "
             f"features {results['features']}.", "",
             "| route | two-sample accuracy (95% CI) | FD | KID x1e3 | precision | recall |", "|---|---|---|---|---|---|"]
    for name in ["floor", "painted", "copy_paste", "grey_hole"]:
        r = results[name]
        ts = r["two_sample"]
        lines.append(f"| {name.replace('_', ' ')}{' (real vs real)' if name == 'floor' else ''} | {ts['accuracy']:.3f} "
                     f"({ts['interval'][0]:.3f}-{ts['interval'][1]:.3f}) | {r['fd']:.2f} | {r['kid']['mean'] * 1e3:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    jc = results.get("judge_checks")
    if jc:
        lines += ["", f"## The real-data judge (`{args.judge}`) on judge-style chips of each instance", ""]
        if "accepted" in jc:
            lines += [f"Accepted: `p_animal` at or above the calibrated bar {jc['p_animal_bar']:.3f} (the "
                      f"{jc['percentile']:g}th percentile on the real held-out instances).", "",
                      "| route | accepted |", "|---|---|"]
            lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in jc["accepted"].items()]
        names = ["real", "painted", "copy_paste", "grey_hole"]
        lines += ["", "Taxon named right (every level of its lineage), per taxon; ratio = painted / real:", "",
                  "| taxon | " + " | ".join(n.replace("_", " ") for n in names) + " | ratio |",
                  "|---|" + "---|" * (len(names) + 1)]
        for t, row in jc["per_taxon"].items():
            cells = [f"{row[n]['accuracy']:.3f} (n={row[n]['n']})" if row[n]["accuracy"] is not None else "-"
                     for n in names]
            a, b = row["painted"]["accuracy"], row["real"]["accuracy"]
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            lines.append(f"| {t} | " + " | ".join(cells) + f" | {ratio} |")
    if results["paint_tiles_per_s"]:
        lines += ["", f"Painting speed: {results['paint_tiles_per_s']:.3f} tiles/s ({args.per_tile} animals per tile, "
                      f"{args.threads} thread(s), CPU)."]
    return "\n".join(lines) + "\n"


def _lineage_from_config(config: str, label: str) -> tuple[str, dict[str, str]]:
    from synthgen.config import load_yaml_mapping
    from taxonomy import Taxonomy

    tax = Taxonomy.load(load_yaml_mapping(config)["taxonomy"])
    t = tax.labels.get(label) or tax.resolve(label)
    return t.name, {a.level: a.name for a in tax.lineage(t)}


if __name__ == "__main__":
    main()

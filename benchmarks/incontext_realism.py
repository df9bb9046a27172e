"""Issue 17's seal figures: can a classifier tell painted seals from real ones on held-out tiles?

Real: every labelled seal of the held-out split, in the window the generator would use for it
(centred on the hole, moved inside the tile). Painted: seals painted at new places on the same
held-out tiles, never over a labelled seal, with sizes from the training labels. Copy-paste: real
training seals warped onto the same new places with their own surroundings (today's cheap route).
Each is compared with the real windows by a two-sample classifier (logistic regression, 5-fold, on
ImageNet EfficientNet-Lite0 features), FD, KID and precision/recall, beside the real-vs-real floor.
Writes JSON + markdown, a sheet of 64 painted vs 64 real windows and previews of painted tiles.

    python benchmarks/incontext_realism.py --model runs/seals-incontext --out benchmarks/results/incontext_seals
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
from synthgen.incontext.windows import corners_of, grow, on_tile, one_per_group
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="in-context model folder")
    ap.add_argument("--checkpoint", help="or a checkpoints/step-N folder (with --config)")
    ap.add_argument("--config", help="the run's train config (with --checkpoint)")
    ap.add_argument("--raw", action="store_true", help="with --checkpoint: raw weights instead of EMA")
    ap.add_argument("--data", default="../shared/data/glacierbay-seals/data.yaml")
    ap.add_argument("--split", default="val", help="held-out split (never trained on)")
    ap.add_argument("--train-split", default="train", help="where copy-paste takes its real seals")
    ap.add_argument("--per-tile", type=int, default=3)
    ap.add_argument("--habitat", help="compose config whose colour habitat rule the shifted places must meet "
                    "(e.g. configs/compose/glacierbay-seals.yaml: seals on ice)")
    ap.add_argument("--placement", choices=["shifted", "anywhere"], default="shifted",
                    help="shifted: beside the tile's labelled seals; anywhere: uniform over the tile (ice or water)")
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
    donors = load_tiles(args.data, args.train_split, pattern)
    donor_seals = [(rgb, c) for _, rgb, cs, _ in donors for c in cs]
    label = next(iter(gen.shapes))
    shapes = gen.shapes[label]
    counts = json.loads((Path(args.model) / "taxon_counts.json").read_text()) if args.model else None
    lineage = next(iter(counts.values()))["lineage"] if counts else _lineage_from_config(args.config, label)
    rng = np.random.default_rng(args.seed)
    hcfg = ComposeConfig.from_yaml(args.habitat).habitat if args.habitat else None
    cfg = PaintConfig(steps=args.steps, guidance={"mode": "cfg", "scale": args.scale}, seed=args.seed)

    real, painted, pasted, grey = [], [], [], []
    previews = []
    paint_seconds, painted_tiles = 0.0, 0
    for k, (_path, rgb, corners, _labels) in enumerate(tiles):
        h, w = rgb.shape[:2]
        for c in corners:  # real seals in the generator's window
            hole = grow(c, gen.window.margin)
            if on_tile(hole, (w, h)):
                real.append(gen.cut(rgb, c)[0])
        if args.placement == "shifted":
            habitat = color_habitat(rgb, hcfg) > 0 if hcfg is not None else None
            places = sample_placements((w, h), corners, shapes, args.per_tile, gen.window.margin, rng, 300,
                                       shifted_proposer(corners), habitat,
                                       hcfg.min_fraction if hcfg is not None else 0.0) if corners else []
        else:
            places = sample_placements((w, h), corners, shapes, args.per_tile, gen.window.margin, rng)
        if not places:
            continue
        placements = [Placement(c, label, label, lineage, seed=args.seed * 100003 + k * 101 + i)
                      for i, c in enumerate(places)]
        ts = time.time()
        painted_tile, _ = gen.paint_tile(rgb, placements, cfg)
        paint_seconds += time.time() - ts
        painted_tiles += 1
        pasted_tile = rgb
        for c in places:
            d_rgb, d_c = donor_seals[int(rng.integers(len(donor_seals)))]
            pasted_tile = copy_paste(pasted_tile, c, d_rgb, d_c, gen.window.margin)
        for c in places:
            painted.append(gen.cut(painted_tile, c)[0])
            pasted.append(gen.cut(pasted_tile, c)[0])
            win, m = gen.cut(rgb, c)[:2]
            grey.append(np.where(m[..., None].astype(bool), win[m == 0].mean(0).astype(np.uint8), win))
        if len(previews) < 4 and len(places) >= 2:
            previews.append((painted_tile, places))

    def pil(xs):
        return [Image.fromarray(x) for x in xs]

    results = {"real_windows": len(real), "painted_windows": len(painted), "tiles": len(tiles),
               "model": args.model or args.checkpoint, "ema": not args.raw, "steps": args.steps, "scale": args.scale,
               "paint_tiles_per_s": painted_tiles / paint_seconds if paint_seconds else None,
               "instances_per_tile": args.per_tile, "placement": args.placement, "habitat": args.habitat}
    for name, imgs in [("painted", painted), ("copy_paste", pasted), ("grey_hole", grey)]:
        r = realism(pil(real), pil(imgs), seed=args.seed, floor=name == "painted")
        results[name] = r["generated"]
        if r["floor"] is not None:
            results["floor"] = r["floor"]
        results["features"] = r["features"]
    results["seconds"] = time.time() - t0
    write_json(out / "results.json", results)

    lines = [f"# In-context seals: realism on held-out tiles ({results['model']})", "",
             f"{len(real)} real seal windows of the `{args.split}` split against {len(painted)} painted at new places "
             f"on the same tiles ({args.per_tile} per tile, placement `{args.placement}`"
             f"{f', habitat rule of `{args.habitat}`' if args.habitat else ''}); {args.steps} DDIM steps, CFG {args.scale}; features "
             f"{results['features']}.", "",
             "| route | two-sample accuracy (95% CI) | FD | KID x1e3 | precision | recall |", "|---|---|---|---|---|---|"]
    for name in ["floor", "painted", "copy_paste", "grey_hole"]:
        r = results[name]
        ts = r["two_sample"]
        lines.append(f"| {name.replace('_', ' ')}{' (real vs real)' if name == 'floor' else ''} | {ts['accuracy']:.3f} "
                     f"({ts['interval'][0]:.3f}-{ts['interval'][1]:.3f}) | {r['fd']:.2f} | {r['kid']['mean'] * 1e3:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    if results["paint_tiles_per_s"]:
        lines += ["", f"Painting speed: {results['paint_tiles_per_s']:.3f} tiles/s ({args.per_tile} seals per 640 px tile, "
                      f"{args.threads} thread(s), CPU)."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    n = min(64, len(painted), len(real))
    pick = np.random.default_rng(args.seed).choice(len(real), n, replace=False)
    atomic_save_image(sheet(painted[:n], 8, 3, f"painted (held-out tiles, new places): first {n}"), out / "sheet_painted.png")
    atomic_save_image(sheet([real[i] for i in pick], 8, 3, f"real held-out seals: {n} at random"), out / "sheet_real.png")
    atomic_save_image(sheet(pasted[:n], 8, 3, f"copy-paste of real training seals: first {n}"), out / "sheet_copy_paste.png")
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


def _lineage_from_config(config: str, label: str) -> dict[str, str]:
    from synthgen.config import load_yaml_mapping
    from taxonomy import Taxonomy

    tax = Taxonomy.load(load_yaml_mapping(config)["taxonomy"])
    t = tax.labels.get(label) or tax.resolve(label)
    return {a.level: a.name for a in tax.lineage(t)}


if __name__ == "__main__":
    main()

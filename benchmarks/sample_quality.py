"""Sample quality of trained generators, and the ablations the seed repositories claim.

For each model folder (e.g. progressive=runs/a flat=runs/b) and each guidance mode (taxonomic, cfg),
generate N chips per taxon of the real chips folder, then measure them with `evaluate_samples` in one
feature space (judge, BioCLIP or CLIP): FD / KID vs real held-out chips beside the real floor,
precision/recall, diversity, memorisation and per-rank taxonomic accuracy. The rarest taxa are
reported separately. Writes OUT/sample_quality.json and OUT/sample_quality.md, one folder per arm.

    python benchmarks/sample_quality.py --model progressive=/work/runs/diffusion/aquarium_small48 \
        --model flat=/work/runs/diffusion/aquarium_flat48 --chips /work/runs/judge_aquarium/chips \
        --features judge:/work/runs/judge_aquarium/judge --n 64 --rare starfish --rare stingray \
        --out benchmarks/results/sample_quality/aquarium
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from synthgen.errors import SynthgenError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=FOLDER of a `synthgen train` model")
    p.add_argument("--chips", required=True, type=Path, help="real chips: train split trained the models, "
                                                             "val/valid split is the held-out reference")
    p.add_argument("--features", required=True, help="judge:DIR | bioclip[:PATH] | clip:NAME[:TAG|PATH]")
    p.add_argument("--guidance", action="append", default=None, help="taxonomic | cfg (repeatable)")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--n", type=int, default=64, help="chips generated per taxon and arm")
    p.add_argument("--labels", nargs="*", default=None, help="labels to generate (default: all in --chips)")
    p.add_argument("--rare", action="append", default=[], help="label reported separately (repeatable)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=None, help="generated pools (default OUT/pools)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from synthgen.guidance import GuidanceConfig
    from synthgen.io_utils import atomic_write, write_json
    from synthgen.metrics import evaluate_samples
    from synthgen.pipelines import GenerateConfig, generate
    from synthgen.scoring import Pool, TaxonSpace, load_scorer

    chips = Pool.load(args.chips)
    space = None if args.features.startswith("judge:") else TaxonSpace.from_rows(chips.rows)
    scorer = load_scorer(args.features, space, device=args.device, batch_size=args.batch_size)
    labels = args.labels or sorted({r["label"] for r in chips.rows if r.get("split") == "train"})
    label_taxon = {r["label"]: r["taxon"] for r in chips.rows}
    models = dict(m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.model)
    work = args.work or args.out / "pools"
    arms = {}
    for name, folder in models.items():
        for mode in args.guidance or ["taxonomic", "cfg"]:
            arm = f"{name}-{mode}"
            pool = work / arm
            gcfg = GenerateConfig(sampler=args.sampler, steps=args.steps, batch_size=args.batch_size,
                                  device=args.device, guidance=GuidanceConfig(mode=mode, scale=args.scale))
            t0 = time.time()
            for label in labels:
                generate(folder, label, args.n, pool, gcfg)
            res = evaluate_samples(pool, args.chips, scorer, args.out / arm, train=args.chips)
            sheet(pool, labels, args.out / arm / "sheet.png")
            arms[arm] = {"model": str(folder), "guidance": mode, "seconds": round(time.time() - t0, 1),
                         "n_generated": args.n * len(labels),
                         "overall": res["overall"], "accuracy_per_level": res["accuracy_per_level"],
                         "rare": {lab: res["per_taxon"].get(label_taxon.get(lab)) for lab in args.rare}}
    sheet(args.chips, labels, args.out / "real_heldout_sheet.png", splits=("val", "valid"))
    summary = {"features": args.features, "chips": str(args.chips), "n_per_taxon": args.n, "scale": args.scale,
               "steps": args.steps, "sampler": args.sampler, "arms": arms}
    write_json(args.out / "sample_quality.json", summary)
    with atomic_write(args.out / "sample_quality.md", "w", encoding="utf-8") as f:
        f.write(markdown(summary))
    return summary


def sheet(pool: Path, labels: list[str], out: Path, per_label: int = 16, splits: tuple[str, ...] = ()) -> None:
    """One row of the first chips per label (a generated pool, or real chips of `splits`), for a person
    to compare the arms with real chips by eye."""
    from PIL import Image, ImageDraw

    from synthgen.io_utils import atomic_save_image, read_jsonl

    rows = {lab: [] for lab in labels}
    for r in read_jsonl(pool / "manifest.jsonl"):
        lab = r.get("query", r.get("label"))
        if lab in rows and len(rows[lab]) < per_label and (not splits or r.get("split") in splits):
            rows[lab].append(pool / r["file"])
    size = max((Image.open(f).size[0] for fs in rows.values() for f in fs[:1]), default=32)
    head, pad = 72, 2
    im = Image.new("RGB", (head + per_label * (size + pad), len(labels) * (size + pad) + pad), "white")
    for i, (lab, files) in enumerate(rows.items()):
        y = pad + i * (size + pad)
        ImageDraw.Draw(im).text((2, y + size // 2 - 6), lab, fill="black")
        for j, f in enumerate(files):
            im.paste(Image.open(f).convert("RGB").resize((size, size)), (head + j * (size + pad), y))
    atomic_save_image(im, out)


def _f(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _pm(p: float, n: int | None) -> str:
    """Accuracy with 2 binomial standard errors, so arm differences can be read against sampling noise."""
    if not n or p is None or p != p:
        return _f(p)
    return f"{p:.3f} ± {2 * math.sqrt(max(p * (1 - p), 1 / n) / n):.3f}"


def markdown(s: dict) -> str:
    arms = s["arms"]
    levels = list(next(iter(arms.values()))["accuracy_per_level"]) if arms else []
    out = [f"# Generator sample quality ({s['features']}, {s['n_per_taxon']} chips per taxon, "
           f"{s['sampler']} {s['steps']} steps, scale {s['scale']})", "",
           "| arm | FD (real floor) | KID (floor) | precision | recall | diversity (real) | taxon accuracy ± 2 SE (real) "
           "| memorised share |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        o = a["overall"]
        out.append(f"| {arm} | {_f(o['fd']['generated'])} ({_f(o['fd']['real'])}) | {_f(o['kid']['generated'])} "
                   f"({_f(o['kid']['real'])}) | {_f(o['precision']['generated'])} | {_f(o['recall']['generated'])} | "
                   f"{_f(o['diversity']['generated'])} ({_f(o['diversity']['real'])}) | "
                   f"{_pm(o['taxon_accuracy']['generated'], a.get('n_generated'))} "
                   f"({_f(o['taxon_accuracy']['real'])}) | "
                   f"{_f(o['memorised_share'])} |")
    out += ["", "Accuracy per rank (generated; real held-out in the last row)", "",
            "| arm | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for arm, a in arms.items():
        out.append(f"| {arm} | " + " | ".join(_f(a["accuracy_per_level"][lv]["generated"]["accuracy"])
                                             for lv in levels) + " |")
    if arms:
        first = next(iter(arms.values()))
        out.append("| real held-out | " + " | ".join(_f(first["accuracy_per_level"][lv]["real"]["accuracy"])
                                                   for lv in levels) + " |")
    rare = sorted({lab for a in arms.values() for lab in a["rare"]})
    if rare:
        out += ["", "Rarest taxa", "", "| arm | taxon | n gen | FD (floor) | KID (floor) | accuracy (real) |",
                "|---|---|---|---|---|---|"]
        for arm, a in arms.items():
            for lab in rare:
                d = a["rare"].get(lab)
                if d:
                    out.append(f"| {arm} | {lab} | {d['n_generated']} | {_f(d['fd'])} ({_f(d['fd_floor'])}) | "
                               f"{_f(d['kid'])} ({_f(d['kid_floor'])}) | {_f(d['accuracy_generated'])} "
                               f"({_f(d['accuracy_real'])}) |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        s = run(args)
    except SynthgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({arm: {"fd": a["overall"]["fd"]["generated"],
                            "taxon_accuracy": a["overall"]["taxon_accuracy"]["generated"]}
                      for arm, a in s["arms"].items()}))
    print(f"{len(s['arms'])} arms evaluated -> {args.out / 'sample_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

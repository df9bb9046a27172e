"""Issue 17's recipe table: each small-data switch of the in-context trainer turned off on its own, at
equal steps and batch (so equal CPU, measured), against the full recipe; every arm scored by
benchmarks/incontext_realism.py on the same held-out tiles (two-sample accuracy, FD, judge acceptance).

Arms: `full` (the base config); `no_dihedral` (horizontal flips only); `no_min_snr` (plain MSE);
`pad_in_loss` (padded window pixels count in the loss); `all_copies` (Roboflow's augmented copies of a
source tile all used, not one); and the full recipe's raw weights against its EMA (`full_raw`).

    python benchmarks/incontext_recipe.py --config configs/train/seals-incontext.yaml --steps 600 \\
        --judge runs/eyes/judge/seals-3min/pretrained --habitat configs/compose/glacierbay-seals.yaml \\
        --work runs/recipe --out benchmarks/results/incontext_recipe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

from synthgen.io_utils import atomic_write, write_json

HERE = Path(__file__).resolve().parent
ARMS = {
    "full": {},
    "no_dihedral": {"dihedral": False, "hflip": True},
    "no_min_snr": {"min_snr_gamma": None},
    "pad_in_loss": {"mask_padding": False},
    "all_copies": {"window": {"group_pattern": None}},
}


def arm_config(base: dict, overrides: dict, steps: int) -> dict:
    cfg = {**base, "steps_per_stage": steps, "checkpoint_every": steps}
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(name: str, cfg: dict, work: Path) -> dict:
    """Train one arm (a killed run resumes; its CPU seconds then count from the restart); returns its CPU
    seconds, kept in the arm's folder so several processes can share one work folder."""
    folder = work / name
    if (folder / "cpu.json").is_file():
        return json.loads((folder / "cpu.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    t = child_cpu()
    subprocess.run([sys.executable, "-c", "from cli import app; app()", "train", "--config", str(folder / "config.yaml"),
                    "--out", str(folder / "model")], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    out = {"cpu_seconds": round(child_cpu() - t, 1)}
    write_json(folder / "cpu.json", out)
    return out


def evaluate(name: str, args, model: Path, out: Path, raw_config: Path | None = None) -> dict:
    if not (out / "results.json").is_file():
        src = ["--checkpoint", str(sorted((model / "checkpoints").iterdir())[-1]), "--config", str(raw_config), "--raw"
               ] if raw_config else ["--model", str(model)]
        subprocess.run([sys.executable, str(HERE / "incontext_realism.py"), *src, "--max-tiles", str(args.max_tiles),
                        "--judge", str(args.judge), *(["--habitat", str(args.habitat)] if args.habitat else []),
                        "--out", str(out)], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="the full recipe (an incontext train config)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--habitat", type=Path)
    ap.add_argument("--max-tiles", type=int, default=40)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = yaml.safe_load(args.config.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {"arms": {}}
    res |= {"config": str(args.config), "steps": args.steps, "max_tiles": args.max_tiles, "judge": str(args.judge)}
    for name in args.arms:
        cfg = arm_config(base, ARMS[name], args.steps)
        arm = res["arms"].get(name, {}) | train(name, cfg, args.work)
        arm["overrides"] = ARMS[name]
        arm["eval"] = evaluate(name, args, args.work / name / "model", args.work / name / "eval")
        res["arms"][name] = arm
        if name == "full":
            res["arms"]["full_raw"] = {"overrides": {"weights": "raw (no EMA)"}, "cpu_seconds": arm["cpu_seconds"],
                                       "eval": evaluate("full_raw", args, args.work / name / "model",
                                                        args.work / name / "eval_raw", args.work / name / "config.yaml")}
        write_json(res_path, res)
    with atomic_write(args.out / "results.md", "w", encoding="utf-8") as f:
        f.write(markdown(res))
    print(f"recipe table: {len(res['arms'])} arms -> {args.out / 'results.md'}")


def markdown(res: dict) -> str:
    lines = [f"# In-context recipe: each switch off on its own ({res['steps']} steps each, `{res['config']}`)", "",
             f"Realism on a seeded {res['max_tiles']} held-out tiles (two-sample accuracy: 0.5 = indistinguishable); "
             f"judge `{res['judge']}` acceptance at its calibrated p_animal bar.", "",
             "| arm | change | training CPU s | two-sample accuracy (95% CI) | FD | judge accepts |",
             "|---|---|---|---|---|---|"]
    for name, arm in res["arms"].items():
        e = arm["eval"]
        ts = e["painted"]["two_sample"]
        acc = e.get("judge_checks", {}).get("accepted", {}).get("painted")
        lines.append(f"| {name} | {json.dumps(arm['overrides']) if arm['overrides'] else 'full recipe'} | "
                     f"{arm['cpu_seconds']:.0f} | {ts['accuracy']:.3f} ({ts['interval'][0]:.3f}-{ts['interval'][1]:.3f}) | "
                     f"{e['painted']['fd']:.1f} | {acc if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

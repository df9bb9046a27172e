"""Speed and memory of the latent (Stable Diffusion + LoRA) backend: training s/step, generation
images/s, peak memory.

Why: users choose between the pixel backend (CPU) and the latent one (GPU) by cost; this gives
the numbers on whatever machine runs it. Without --base-model it builds a tiny random SD (the
test components), so on CPU it measures the pipeline's overhead, not real SD cost.
Writes benchmarks/results/latent_speed.{json,md}; rows for other devices/models are kept.
Run: python benchmarks/latent_speed.py [--base-model DIR_OR_HUB_ID --resolution 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from detection import read_dataset
from detection.chips import ChipConfig, make_chips
from synthgen.device import resolve_device
from synthgen.io_utils import atomic_write, read_jsonl, write_json
from synthgen.latent import LatentGenerateConfig, LatentTrainConfig, generate_latent, load_sd, train_latent
from synthgen.latent.tiny import build_tiny_sd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results"


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; whole-process peak


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-model", default=None, help="diffusers folder or hub id; default: a tiny random SD")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--gen-images", type=int, default=4)
    ap.add_argument("--gen-steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy shared CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base_model or str(build_tiny_sd(tmp / "tiny-sd"))
        chips = tmp / "chips"
        make_chips(read_dataset(DATA / "aquarium", splits=["train"]), chips, ChipConfig(size=64, max_per_class=4),
                   taxonomy=REPO / "configs" / "taxonomy" / "aquarium.csv", split="train")
        cfg = LatentTrainConfig(base_model=base, resolution=args.resolution, batch_size=args.batch_size,
                                levels=["phylum", "class"], steps_per_stage=[1, args.train_steps], device=args.device,
                                gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=10**6)
        _reset(device)
        train_latent(cfg, chips, tmp / "model", progress=False)
        train_peak = _peak_mb(device)
        log = read_jsonl(tmp / "model" / "loss.jsonl")
        s_step = (log[-1]["seconds"] - log[1]["seconds"]) / (len(log) - 2)  # steady state: skip warm-up steps
        gcfg = LatentGenerateConfig(resolution=args.resolution, steps=args.gen_steps, batch_size=args.gen_images,
                                    device=args.device, guidance={"mode": "taxonomic"})
        sd = load_sd(base)
        generate_latent(tmp / "model", "fish", 1, tmp / "warm", gcfg.model_copy(update={"batch_size": 1}), sd=sd,
                        progress=False)
        sd = load_sd(base)
        _reset(device)
        t0 = time.perf_counter()
        res = generate_latent(tmp / "model", "fish", args.gen_images, tmp / "pool", gcfg, sd=sd, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        gen_s = time.perf_counter() - t0
        gen_peak = _peak_mb(device)
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, shared)",
        "base_model": args.base_model or "tiny random SD (test components)",
        "resolution": args.resolution, "batch_size": args.batch_size, "train_steps": args.train_steps,
        "s_per_step": round(s_step, 4), "train_peak_mb": round(train_peak, 1),
        "gen_images": res.written, "gen_steps": args.gen_steps, "guidance": "taxonomic (3 UNet branches)",
        "images_per_s": round(res.written / gen_s, 4), "gen_peak_mb": round(gen_peak, 1),
        "bf16": device.type == "cuda", "threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "latent_speed.json"
    old = json.loads(path.read_text()) if path.exists() else []
    key = ("device", "base_model", "resolution", "batch_size")
    rows = [r for r in old if tuple(r[k] for k in key) != tuple(row[k] for k in key)] + [row]
    write_json(path, rows)
    lines = ["# Latent backend speed", "",
             "Peak memory: CUDA max allocated, or on CPU the whole process's peak RSS.", "",
             "| device | threads | base model | px | batch | s/step | train peak MB | gen steps | images/s | gen peak MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r.get('threads', '-')} | {r['base_model']} | {r['resolution']} | {r['batch_size']} | {r['s_per_step']} | "
              f"{r['train_peak_mb']} | {r['gen_steps']} | {r['images_per_s']} | {r['gen_peak_mb']} |" for r in rows]
    with atomic_write(OUT / "latent_speed.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"s/step {row['s_per_step']}, images/s {row['images_per_s']} -> {OUT / 'latent_speed.md'}")


if __name__ == "__main__":
    main()

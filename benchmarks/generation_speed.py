"""Generation speed: our guided sampling loop vs a stock diffusers pipeline loop on the same UNet.

Both run the same model, scheduler (DDIM), steps and guidance (taxonomic, conditional and reference
passes concatenated into one forward, as diffusers pipelines do for CFG), in the same process, on the
same noise. Times the stock loop, our exact sampler (cache_interval=1) and our sampler with DeepCache
feature reuse, interleaved, and reports median chips/s, peak memory (CUDA: max allocated; CPU: peak RSS
increase sampled every 5 ms) and the speed ratios. Then measures what the cache costs: cached vs exact
images from the same seeds (mean abs pixel difference, PSNR) on the random model and, with
--trained-model, on a trained one. Writes JSON + a markdown table under benchmarks/results/.

    python benchmarks/generation_speed.py --preset tiny --batch-sizes 8 --device cpu --threads 1 \
        --trained-model runs/tiny64   # any `synthgen train` folder, e.g. tiny preset, 64 px, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from synthgen.device import resolve_device
from synthgen.guidance import GuidanceConfig, combine, reference_codes
from synthgen.io_utils import atomic_write, write_json
from synthgen.models import ConditionedUNet, TaxonVocab
from synthgen.pipelines import GuidedSampler, load_model
from synthgen.schedulers import make_scheduler
from synthgen.train.trainer import DDPMScheduler

RESULTS = Path(__file__).parent / "results"


def stock_loop(model, sched_cfg, noise, codes, refs, steps, scale):
    """What a diffusers pipeline's __call__ does: cat, scale_model_input, unet (the taxonomy encoder
    runs inside it every step), chunk, guidance, scheduler.step, progress bar; under no_grad."""
    sched = make_scheduler("ddim", sched_cfg)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    cond = torch.cat([codes, refs])
    with torch.no_grad():
        for t in tqdm(sched.timesteps, disable=True):
            inp = sched.scale_model_input(torch.cat([x] * 2), t)
            eps = model(inp, t, cond)
            e_c, e_r = eps.chunk(2)
            x = sched.step(combine(e_c, e_r, scale), t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class PeakMemory:
    """Peak memory of the block: CUDA max allocated, or the peak RSS increase on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        self.proc, self.base, self.stop = psutil.Process(), psutil.Process().memory_info().rss, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


def timed_interleaved(fns: dict, device, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds and peak MiB per variant, after one warm-up each; the variants take turns within
    every repeat, so load from other jobs on the machine hits them alike."""
    for fn in fns.values():
        fn()
    secs: dict[str, list[float]] = {k: [] for k in fns}
    mem = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakMemory(device) as pm:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                secs[name].append(time.perf_counter() - t0)
            mem[name] = max(mem[name], pm.mib)
    return {k: (statistics.median(v), mem[k]) for k, v in secs.items()}


def deviation(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean abs difference (0-255 scale) and PSNR (dB) of two uint8 image batches."""
    d = a.float() - b.float()
    mse = float((d**2).mean())
    return {"mean_abs": round(float(d.abs().mean()), 2),
            "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else float("inf")}


def deviation_rows(name, model, sched_cfg, codes, refs, guidance, steps, intervals, equal_steps, n_images, device):
    """Cached vs exact sampling from the same seeds, next to exact sampling with as few steps as cost the
    same time (the plain way to buy that speed) and to exact samples from other seeds (the scale)."""
    size = model.sample_size
    noise = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    other = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    exact = GuidedSampler(model, sched_cfg, "ddim", steps)
    ref = exact(noise, codes, refs, guidance)
    rows = [{"model": name, "variant": "exact, other seeds", **deviation(exact(other, codes, refs, guidance), ref)}]
    for k in intervals:
        cached = GuidedSampler(model, sched_cfg, "ddim", steps, cache_interval=k)(noise, codes, refs, guidance)
        rows.append({"model": name, "variant": f"cache_interval={k}, {steps} steps", **deviation(cached, ref)})
        n = equal_steps[k]
        fewer = GuidedSampler(model, sched_cfg, "ddim", n)(noise, codes, refs, guidance)
        rows.append({"model": name, "variant": f"exact, {n} steps (same time as cache_interval={k})",
                     **deviation(fewer, ref)})
    return rows


def trained_codes(model: ConditionedUNet, folder: Path, n: int, guidance: GuidanceConfig):
    """Codes of the model's trained taxa (taxon_counts.json), cycled over n images, and their references."""
    counts = json.loads((folder / "taxon_counts.json").read_text(encoding="utf-8"))
    lineages = [c["lineage"] for _, c in sorted(counts.items())]
    codes = [model.vocab.encode(lineages[i % len(lineages)]) for i in range(n)]
    refs = [reference_codes(c, guidance.mode, guidance.reference, model.vocab.levels) for c in codes]
    return torch.tensor(codes), torch.tensor(refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--cache-intervals", default="3,5", help="DeepCache intervals to time next to the exact sampler")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA only)")
    ap.add_argument("--trained-model", type=Path, default=None,
                    help="a `synthgen train` folder: also measure the cache's deviation on a trained model")
    ap.add_argument("--deviation-images", type=int, default=8)
    ap.add_argument("--tag", default=None, help="result file suffix (default: device type)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    intervals = [int(k) for k in args.cache_intervals.split(",") if k]
    torch.manual_seed(0)
    vocab = TaxonVocab(levels=["kingdom", "class", "order", "genus"],
                       names={"kingdom": ["Animalia"], "class": ["Aves", "Mammalia"], "order": ["A", "B", "C"],
                              "genus": ["g1", "g2", "g3", "g4"]})
    model = ConditionedUNet.create(args.preset, args.size, vocab).eval().to(device)  # random weights: speed only
    model.unet.to(memory_format=torch.channels_last)
    sched_cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config)
    guidance = GuidanceConfig(mode="taxonomic", scale=args.scale, reference="parent")
    target = (1, 2, 3, 4)
    ref = reference_codes(target, "taxonomic", "parent", vocab.levels)
    samplers = {"exact": GuidedSampler(model, sched_cfg, "ddim", args.steps, compile=args.compile)}
    samplers |= {f"cache{k}": GuidedSampler(model, sched_cfg, "ddim", args.steps, cache_interval=k) for k in intervals}
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        noise = torch.randn(bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        codes = torch.tensor([target] * bs, device=device)
        refs = torch.tensor([ref] * bs, device=device)
        stock = stock_loop(model, sched_cfg, noise, codes, refs, args.steps, args.scale)
        max_diff = int((samplers["exact"](noise, codes, refs, guidance).int() - stock.int()).abs().max())
        fns = {"stock": lambda: stock_loop(model, sched_cfg, noise, codes, refs, args.steps, args.scale)}  # noqa: B023
        fns |= {k: (lambda s=s: s(noise, codes, refs, guidance)) for k, s in samplers.items()}  # noqa: B023
        res = timed_interleaved(fns, device, args.repeats)
        t_stock, m_stock = res["stock"]
        row = {"batch": bs, "stock_chips_s": round(bs / t_stock, 2), "stock_peak_mib": m_stock,
               "exact_vs_stock_max_pixel_diff": max_diff, "variants": {}}
        for k in samplers:
            t, m = res[k]
            row["variants"][k] = {"chips_s": round(bs / t, 2), "vs_stock": round(t_stock / t, 3),
                                  "vs_exact": round(res["exact"][0] / t, 3), "peak_mib": m}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # exact steps that cost what the cached sampler costs, from the largest batch's timings
    last = rows[-1]["variants"]
    equal_steps = {k: max(1, round(args.steps / last[f"cache{k}"]["vs_exact"])) for k in intervals}
    n_dev = args.deviation_images
    devs = []
    if n_dev > 0:  # 0: speed only
        dev_codes = torch.tensor([target] * n_dev, device=device), torch.tensor([ref] * n_dev, device=device)
        devs = deviation_rows("untrained", model, sched_cfg, *dev_codes, guidance, args.steps, intervals,
                              equal_steps, n_dev, device)
    if args.trained_model and n_dev > 0:
        trained, trained_sched = load_model(args.trained_model, device)
        devs += deviation_rows("trained", trained, trained_sched,
                               *(c.to(device) for c in trained_codes(trained, args.trained_model, n_dev, guidance)),
                               guidance, args.steps, intervals, equal_steps, n_dev, device)
    for d in devs:
        print(json.dumps(d), flush=True)
    tag = args.tag or device.type
    meta = {"preset": args.preset, "size": args.size, "steps": args.steps, "sampler": "ddim", "guidance": "taxonomic",
            "scale": args.scale, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": args.compile,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "repeats": args.repeats,
            "cache_intervals": intervals, "load_avg_1m": round(os.getloadavg()[0], 2),
            "trained_model": str(args.trained_model) if args.trained_model else None, "deviation_images": n_dev}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"generation_speed_{tag}.json", {"config": meta, "results": rows, "deviation": devs})
    names = {"exact": "ours exact", **{f"cache{k}": f"ours cache_interval={k}" for k in intervals}}
    lines = [f"# Generation speed ({tag}): {args.preset} preset ({meta['params_m']} M params), {args.size} px, "
             f"{args.steps} DDIM steps, taxonomic guidance w={args.scale}, {meta['threads']} threads",
             "", f"Median of {args.repeats} interleaved repeats; ratios against the stock loop timed in the same run "
             f"(1-minute load average {meta['load_avg_1m']} at the end).", "",
             "| batch | sampler | chips/s | vs stock | vs ours exact | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | stock diffusers loop | {r['stock_chips_s']} | 1.0x | | {r['stock_peak_mib']} |")
        lines += [f"| {r['batch']} | {names[k]} | {v['chips_s']} | {v['vs_stock']}x | {v['vs_exact']}x | {v['peak_mib']} |"
                  for k, v in r["variants"].items()]
    lines += ["", "Ours exact vs stock, max pixel difference: "
              + ", ".join(f"batch {r['batch']}: {r['exact_vs_stock_max_pixel_diff']}" for r in rows) + "."]
    if devs:
        lines += ["", f"## Cost in quality: {n_dev} images, same seeds, against ours exact at {args.steps} steps", "",
                  f"untrained: the random benchmark model; trained: {meta['trained_model']}.", "",
                  "| model | variant | mean abs pixel diff (0-255) | PSNR dB |", "|---|---|---|---|"]
        lines += [f"| {d['model']} | {d['variant']} | {d['mean_abs']} | {d['psnr_db']} |" for d in devs]
    with atomic_write(RESULTS / f"generation_speed_{tag}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'generation_speed_{tag}.md'}")


if __name__ == "__main__":
    main()

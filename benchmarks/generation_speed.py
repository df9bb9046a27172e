"""Generation speed: our guided sampling loop vs a stock diffusers pipeline loop on the same UNet.

Both run the same model, scheduler (DDIM), steps and guidance (taxonomic, conditional and reference
passes concatenated into one forward, as diffusers pipelines do for CFG), in the same process, on the
same noise. Reports chips/s, peak memory (CUDA: max allocated; CPU: peak RSS increase sampled every
5 ms) and the speed ratio. Writes JSON + a markdown table under benchmarks/results/.

    python benchmarks/generation_speed.py --preset small --batch-sizes 8,32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
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
from synthgen.pipelines import GuidedSampler, make_scheduler
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


def timed(fn, device, repeats):
    """Best-of-`repeats` seconds (after one warm-up call) and peak memory."""
    fn()
    best, mem = float("inf"), 0.0
    for _ in range(repeats):
        with PeakMemory(device) as pm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        mem = max(mem, pm.mib)
    return best, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA only)")
    ap.add_argument("--tag", default=None, help="result file suffix (default: device type)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
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
    ours = GuidedSampler(model, sched_cfg, "ddim", args.steps, compile=args.compile)
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        noise = torch.randn(bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        codes = torch.tensor([target] * bs, device=device)
        refs = torch.tensor([ref] * bs, device=device)
        a = ours(noise, codes, refs, guidance)
        b = stock_loop(model, sched_cfg, noise, codes, refs, args.steps, args.scale)
        max_diff = int((a.int() - b.int()).abs().max())
        t_ours, m_ours = timed(lambda: ours(noise, codes, refs, guidance), device, args.repeats)  # noqa: B023
        t_stock, m_stock = timed(lambda: stock_loop(model, sched_cfg, noise, codes, refs, args.steps, args.scale),  # noqa: B023
                                 device, args.repeats)
        row = {"batch": bs, "ours_chips_s": round(bs / t_ours, 2), "stock_chips_s": round(bs / t_stock, 2),
               "speedup": round(t_stock / t_ours, 3), "ours_peak_mib": m_ours, "stock_peak_mib": m_stock,
               "max_pixel_diff": max_diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
    tag = args.tag or device.type
    meta = {"preset": args.preset, "size": args.size, "steps": args.steps, "sampler": "ddim", "guidance": "taxonomic",
            "scale": args.scale, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": args.compile,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "repeats": args.repeats}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"generation_speed_{tag}.json", {"config": meta, "results": rows})
    lines = [f"# Generation speed ({tag}): {args.preset} preset ({meta['params_m']} M params), {args.size} px, "
             f"{args.steps} DDIM steps, taxonomic guidance w={args.scale}, {meta['threads']} threads",
             "", "| batch | ours chips/s | stock loop chips/s | speed-up | ours peak MiB | stock peak MiB | max pixel diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['ours_chips_s']} | {r['stock_chips_s']} | {r['speedup']}x | {r['ours_peak_mib']} | "
              f"{r['stock_peak_mib']} | {r['max_pixel_diff']} |" for r in rows]
    with atomic_write(RESULTS / f"generation_speed_{tag}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'generation_speed_{tag}.md'}")


if __name__ == "__main__":
    main()

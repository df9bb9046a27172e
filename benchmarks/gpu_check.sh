#!/usr/bin/env bash
# A lent GPU, used at once (under 10 minutes on one H200-class GPU; issue 19):
#   1. generation chips/s at 64 px: our guided sampler vs the stock diffusers loop (generation_speed.py);
#   2. one latent LoRA training step: time and peak memory (latent_speed.py);
#   3. one GPU-scale benchmark cell: the seals at 10 % real, one seed, every arm (scale gpu-cell).
# Writes JSON + markdown under benchmarks/results/gpu/ (summary.json, summary.md, and each part's files).
# Run from the repository root: bash benchmarks/gpu_check.sh  [CELL_SECONDS, default 330]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
CELL_S=${1:-330}
START=$(date +%s)
declare -A SECS RC

step() {  # step NAME TIMEOUT CMD...: run with a limit, keep its exit code and wall time, go on either way
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  set +e; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; RC[$name]=${PIPESTATUS[0]}; set -e
  SECS[$name]=$(( $(date +%s) - t0 ))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
step generation 150 python benchmarks/generation_speed.py --preset small --size 64 --batch-sizes 32,128 \
  --repeats 2 --device cuda --tag gpu
cp benchmarks/results/generation_speed_gpu.json benchmarks/results/generation_speed_gpu.md "$OUT/" 2>/dev/null || true
step latent 90 python benchmarks/latent_speed.py --device cuda --train-steps 1 --gen-images 2 --gen-steps 4
cp benchmarks/results/latent_speed.json benchmarks/results/latent_speed.md "$OUT/" 2>/dev/null || true
step cell "$CELL_S" synthgen benchmark --config configs/benchmarks/glacierbay-seals.yaml --scale gpu-cell \
  --work runs/gpu_check/cell --out "$OUT/cell" --device auto

python - "$OUT" "$(( $(date +%s) - START ))" \
  "generation=${RC[generation]}:${SECS[generation]}" "latent=${RC[latent]}:${SECS[latent]}" \
  "cell=${RC[cell]}:${SECS[cell]}" <<'PY'
import json, sys
from pathlib import Path

from synthgen.io_utils import atomic_write, write_json

out, total, parts = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rows = {p.split("=")[0]: dict(zip(("rc", "seconds"), map(int, p.split("=")[1].split(":")))) for p in parts}
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else "unknown"
res = out / "cell" / "results.json"
cell = json.loads(res.read_text()) if res.is_file() else None
summary = {"gpu": gpu, "total_seconds": total, "parts": rows,
           "cell": None if cell is None else {"runs": [{k: r[k] for k in ("arm", "map50", "optimizer_steps")}
                                                       for r in cell["runs"]], "intervals": cell["intervals"],
                                              "stage_seconds": cell["stage_seconds"]}}
write_json(out / "summary.json", summary)
lines = [f"# GPU check on {gpu}: {total} s", "",
         "Command: `bash benchmarks/gpu_check.sh` (generation_speed.md, latent_speed.md and cell/report.md beside this)",
         "", "| part | exit code | seconds |", "|---|---|---|",
         *[f"| {k} | {v['rc']} | {v['seconds']} |" for k, v in rows.items()]]
if cell:
    lines += ["", "| arm | mAP50 | optimizer steps |", "|---|---|---|",
              *[f"| {r['arm']} | {r['map50']:.3f} | {r['optimizer_steps']} |" for r in summary["cell"]["runs"]]]
with atomic_write(out / "summary.md") as f:
    f.write("\n".join(lines) + "\n")
print(f"-> {out / 'summary.md'}")
PY

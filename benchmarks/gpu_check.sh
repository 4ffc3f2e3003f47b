#!/usr/bin/env bash
# The device check of issue 13 as one prepared script, for a session lent a CUDA machine:
# the whole-step table, the layer table and the statistics formulations, each written to
# ${OUT:-benchmarks/gpu_out}/ (commit the tables with the machine named in them).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" || true
"$python" benchmarks/step.py --gpu --rounds 20 --out "$out/results_step_gpu.md"
"$python" benchmarks/run.py --gpu --rounds 20 --out "$out/results_gpu.md"
"$python" benchmarks/variants.py --gpu --rounds 30 > "$out/variants_gpu.md"

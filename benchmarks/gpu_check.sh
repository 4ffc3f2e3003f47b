#!/usr/bin/env bash
# The device check of issue 13 as one prepared script, for a session lent a CUDA machine. Each
# part has its own time limit and runs even if an earlier one failed; everything lands in
# ${OUT:-benchmarks/gpu_out}/ (seven files: log.txt, the tables, the steps' optimized HLO, the
# profile's device events):
#   1. tests/functional/test_gpu_moments.py on the GPU (the compiled Triton kernel, not the interpreter);
#   2. the whole ResNet-18 step (step.py --gpu): jaxbn as it is and with the one-read kernel on
#      ("jaxbn one-read", jaxbn.Strategy(one_read="cuda")), against flax;
#   3. where the step's time goes, kernel by kernel (profile_step.py --gpu): what one norm adds
#      in kernels, kernel time and idle time, for the same jaxbn settings and flax;
#   4. the layer table (run.py --gpu);
#   5. the float32 accuracy table with the compiled kernel (variants.py --accuracy).
# The statistics alone (variants.py --gpu --statistics, measured once) are no longer part of it.
# Commit the tables with the machine named in them.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
log="$out/log.txt"
part() {  # part SECONDS NAME COMMAND...: run with a time limit, log its output and how it ended
  local seconds=$1 name=$2 start=$SECONDS
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" >> "$log"
  timeout "$seconds" "$@" >> "$log" 2>&1
  echo -e "\n=== $name: exit $?, $((SECONDS - start)) s" >> "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
"$python" -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'torch', torch.__version__, jax.devices())" >> "$log" 2>&1
part 60 tests "$python" -m pytest -q -n 0 -p no:cacheprovider tests/functional/test_gpu_moments.py
part 170 step "$python" benchmarks/step.py --gpu --rounds 20 --compiles 1 \
  --hlo-dir "$out/hlo" --out "$out/results_step_gpu.md"
[ -d "$out/hlo" ] && tar czf "$out/hlo.tar.gz" -C "$out" hlo && rm -rf "$out/hlo"
part 150 profile "$python" benchmarks/profile_step.py --gpu --steps 10 --contender jaxbn \
  --contender "jaxbn one-read" --contender flax \
  --out "$out/profile_gpu.md" --events "$out/profile_events.csv.gz"
part 90 layers "$python" benchmarks/run.py --gpu --rounds 20 --out "$out/results_gpu.md"
part 30 accuracy sh -c "'$python' benchmarks/variants.py --gpu --accuracy > '$out/accuracy_gpu.md'"
echo "=== done ($(date -u +%H:%M:%S))" >> "$log"

#!/usr/bin/env bash
# expected: ~110 s (120 s at most). Pallas paged attention on the GPU (issue 27 section 1):
# the gpu-marked kernel tests compiled (not interpreted); decode attention of the 8B shape at
# 4K/32K/128K over bf16 and int8 pages against HBM bandwidth measured in the same run, the
# 128K int8 cache held beside 16 GB of bf16 weights, the kernel checked against the
# reference past 4 GiB of cache, a prefill chunk, a knob sweep (bench_attention --gpu,
# figures saved after each run); then the engine generating with the pallas backend against
# the reference. Each stage has its own time limit; none stops the next. Writes
# $OUT/attn.log and $OUT/attn.json. SMOKE=1: the benchmark's tiny sizes (CPU check).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD:${PYTHONPATH:-}
stage() {  # stage NAME SECONDS CMD...: run with a hard limit, log its time and status
  local name=$1 limit=$2 t0=$(date +%s); shift 2
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "== $name: $(( $(date +%s) - t0 )) s, exit $rc$( ((rc == 124)) && echo ' (timed out)')"
}
{
  date -u; nvidia-smi -L 2>/dev/null
  timeout 20 python3 -c "import jax, sys; print(sys.version.split()[0], jax.__version__, jax.devices())"
  stage "gpu kernel tests" 40 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu_attention.py
  stage "bench_attention --gpu" 45 python3 scripts/bench_attention.py --gpu --json "$OUT/attn.json"
  stage "engine with pallas" 30 python3 -m pytest -q -p no:cacheprovider -k engine_generates tests/test_gpu_attention.py
} 2>&1 | tee "$OUT/attn.log"

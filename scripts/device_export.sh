#!/usr/bin/env bash
# expected seconds: 120 (GGUF <= 45 s, then an export and five starts until 115 s; SMOKE=1: CPU, 1 layer)
# Process start to first token on the GPU machine for a synthetic Qwen3-30B-A3B-shape MoE
# (random weights, experts Q4_K; the family's default rules: routed experts packed for the
# host kernels, the rest bf16 on the GPU): cold (empty compilation cache), from `ktjax export`
# artifacts, with the persistent cache, and of JAX alone, the floor under any start
# (scripts/bench_startup.py, one run each, the floor last). 4 of the 48 layers
# (EXPORT_LAYERS), so the GGUF is written and repacked within the time: the cold start's
# repacking grows with the layers, the artifact start's read of packed bytes less so.
# Every stage is bounded: bench_startup kills a start still running at its deadline and keeps
# going; $OUT/export.json holds the figures so far after each stage (and the failures, under
# "errors"); $OUT/export.log the human log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/export.log"
JSON="$OUT/export.json"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
LAYERS=${EXPORT_LAYERS:-4}
if [ "${SMOKE:-0}" = 1 ]; then LAYERS=1; export JAX_PLATFORMS=cpu; fi
M=/tmp/ktjax-export-qwen3-30b-a3b-$LAYERS.gguf
t0=$(date +%s)
echo '[{"errors": ["started; no stage finished"]}]' > "$JSON"
{
  echo "device_export: $(date -u) layers=$LAYERS"
  timeout -k 5 30 python3 -c "import jax; print('jax', jax.__version__, jax.devices())" \
    || echo "jax start failed or timed out"
  if timeout -k 5 45 python3 scripts/make_synthetic_gguf.py --shape qwen3-30b-a3b \
      --layers "$LAYERS" --experts-qtype Q4_K "$M"; then
    echo "gguf written at $(( $(date +%s) - t0 )) s"
    left=$(( 115 - ($(date +%s) - t0) ))
    # --exact: the benchmark request's programs only (prefill of its prompt, one decode step);
    # the outer timeout only backs up --deadline
    timeout -k 5 $(( left + 3 )) python3 scripts/bench_startup.py --model "$M" --runs 1 \
      --max-model-len 64 --kinds greedy --exact --deadline "$left" --json "$JSON"
    echo "bench rc=$?"
  else
    echo '[{"errors": ["writing the synthetic GGUF failed or took over 45 s"]}]' > "$JSON"
    echo "GGUF writing failed"
  fi
  echo "total $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$LOG"
rm -f "$M"

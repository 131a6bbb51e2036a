#!/usr/bin/env bash
# expected seconds: 120 (GGUF ~20 s, an export and four starts ~90 s; the bench is cut at 118 s, its JSON kept); SMOKE=1: CPU, 1 layer
# Process start to first token on the GPU machine for a synthetic Qwen3-30B-A3B-shape MoE
# (random weights, experts Q4_K; the family's default rules: routed experts packed for the
# host kernels, the rest bf16 on the GPU): cold (empty compilation cache), with the persistent
# cache, and from `ktjax export` artifacts (scripts/bench_startup.py, one run each). 4 of the
# 48 layers (EXPORT_LAYERS), so the GGUF is written and repacked within the time: the cold
# start's repacking grows with the layers, the artifact start's read of packed bytes less so.
# Writes $OUT/export.log and $OUT/export.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/export.log"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
LAYERS=${EXPORT_LAYERS:-4}
if [ "${SMOKE:-0}" = 1 ]; then LAYERS=1; export JAX_PLATFORMS=cpu; fi
M=/tmp/ktjax-export-qwen3-30b-a3b-$LAYERS.gguf
t0=$(date +%s)
{
  echo "device_export: $(date -u) layers=$LAYERS"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  timeout 60 python3 scripts/make_synthetic_gguf.py --shape qwen3-30b-a3b --layers "$LAYERS" \
    --experts-qtype Q4_K "$M" || { echo "GGUF writing failed"; exit 1; }
  echo "gguf written at $(( $(date +%s) - t0 )) s"
  # --exact: the benchmark request's programs only (prefill of its prompt, one decode step)
  timeout $(( 118 - ($(date +%s) - t0) )) python3 scripts/bench_startup.py --model "$M" \
    --runs 1 --max-model-len 64 --kinds greedy --exact --json "$OUT/export.json"
  echo "rc=$? total $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$LOG"
rm -f "$M"

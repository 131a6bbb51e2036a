#!/usr/bin/env bash
# expected: <= 90 s (the native module is already built by the lead; bench_moe needs no GGUF)
# Host MoE kernels on the AMX host: experts in IQ4_XS / MXFP4 / IQ2_XXS (repacked exactly to
# int4 indices into their 16-entry tables) against the same experts in Q4_K, decode (qlen 1) and a small prefill
# (qlen 32). Writes $OUT/quants.log and $OUT/quants.json (one JSON object per line).
# SMOKE=1: tiny run to check the script on any CPU.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu PYTHONPATH=$PWD:${PYTHONPATH:-}
LOG="$OUT/quants.log" JSON="$OUT/quants.json"
: > "$JSON"
if [ "${SMOKE:-0}" = 1 ]; then
  ARGS=(--layers 2 --experts 8 --min-time 0.05)
else
  ARGS=(--layers 24 --experts 16 --min-time 0.5)
fi
t0=$(date +%s)
{
  echo "device_quants: $(timeout 30 python3 -c 'from ktjax import _native as n; print(n.active_isa(), n.num_threads(), "threads")' 2>&1)"
  timeout 80 python3 scripts/bench_moe.py --shape qwen3-30b-a3b --qlen 1,32 \
    --format q4_k,iq4_xs,mxfp4,iq2_xxs "${ARGS[@]}" --json | tee -a "$JSON"; rc=${PIPESTATUS[0]}
  echo "rc=$rc after $(( $(date +%s) - t0 )) s"
  echo "{\"measure\": \"device_quants_done\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$JSON"
} 2>&1 | tee "$LOG"

#!/usr/bin/env bash
# expected: <= 240 s on the accelerator machine (stages past BUDGET=230 are skipped; BUDGET=560
# should reach every stage of the first model within the 10-minute command limit; skips are logged)
# Hybrid GPU + host MoE against ktjax CPU-only and llama.cpp's --n-cpu-moe, same GGUFs, same run:
# synthetic Qwen3-30B-A3B shape (48 layers, experts Q4_K), then DeepSeek-V2-Lite (27 layers) while
# the budget lasts. Per model: ktjax hybrid (experts on the host, 16 threads; decode batch 1 and 8
# with the step against its ideal, the CUDA calls per step from a profile, prefill 512 and
# 8 x 512), llama-bench
# -ngl 99 -ncmoe <all layers> -t 16 -fa 1, ktjax CPU-only, ktjax hybrid with the layer loop
# unrolled (KTJAX_COMMAND_BUFFERS=layers), then the same partial placement in
# both (GPU_LAYERS: the last layers' experts on the GPU), one layer's prefill on the host vs
# streamed to the GPU, prefill tok/s at 512 and 4096 tokens with the host experts and with every
# layer's experts streamed (device_prefill_min_tokens), decode with expert deferral (DEFER=2),
# its accuracy on a real GGUF (MOE_GGUF), the synchronous bridge (before), and output agreement
# hybrid vs all-GPU on a 2-layer cut of the shape (all-GPU dequantizes every expert). After the
# main runs come the outputs, the prefill runs and the partial placement (its device experts are
# dequantized at load: slow for many layers), then deferral and diagnostics; HYBRID_LIMIT bounds
# the main hybrid run (default 130 s; a 48-layer load takes about 50 s of it).
# Writes $OUT/hybrid.log and $OUT/hybrid.json. SMOKE=1: tiny model on this machine's CPU.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/hybrid.log"
J="$OUT/hybrid.jsonl"
: > "$LOG"; : > "$J"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
T0=$(date +%s)
BUDGET=${BUDGET:-230}
THREADS=${THREADS:-16}
D=${SYN_DIR:-/tmp/syn-hybrid}
mkdir -p "$D"
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# stage NAME MIN_SECONDS LIMIT CMD...: runs CMD (JSON lines to $J, the rest to the log) if at
# least MIN_SECONDS of the budget remain, for at most LIMIT seconds (or what is left).
stage() {
  local name=$1 need=$2 limit=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then log "skip $name: ${l}s left, needs ${need}s"; return 1; fi
  [ "$limit" -gt "$l" ] && limit=$l
  log "start $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > /tmp/stage.out 2>> "$LOG"
  local rc=$?
  grep '^{' /tmp/stage.out | sed "s/^{/{\"stage\": \"$name\", /" | tee -a "$J" >> "$LOG"
  grep -v '^{' /tmp/stage.out | tail -"${TAIL:-5}" >> "$LOG"
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - T0 ))}" >> "$J"
  write_json
  log "end $name rc=$rc"
  return $rc
}
# hybrid.json: every row so far (rewritten after each stage, so a cut-off run still has it)
write_json() {
  python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({'rows': rows}, open(sys.argv[2], 'w'), indent=1)" "$J" "$OUT/hybrid.json" 2>> "$LOG"
}
# llama-bench's rows as JSON lines (a command line for `stage`: timeout runs no shell functions)
llama_cmd() {  # llama_cmd MODEL NCMOE
  echo "\"$LLAMA_BIN/llama-bench\" -m \"$1\" -ngl 99 -ncmoe $2 -t $THREADS -fa 1 -p 512 -n 32 -r 2 -o json | python3 -c \"import json,sys; [print(json.dumps({'engine': 'llama.cpp', 'ncmoe': $2, 'n_prompt': r['n_prompt'], 'n_gen': r['n_gen'], 'tps': r['avg_ts']})) for r in json.load(sys.stdin)]\""
}
BENCH="python3 scripts/bench_hybrid.py --threads $THREADS --json"

python3 -c "from ktjax import _native; _native.moe_site_dry_run" 2>/dev/null || {
  log "native module lacks the hybrid calls: building"
  cmake -S . -B /tmp/kb -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" > /tmp/configure.log 2>&1 &&
  timeout 200 cmake --build /tmp/kb -j"$(nproc)" > /tmp/build.log 2>&1 && cp /tmp/kb/_native*.so ktjax/ ||
  { log "build failed"; tail -20 /tmp/build.log >> "$LOG"; exit 1; }
}

if [ "${SMOKE:-0}" = 1 ]; then
  MODELS="tiny:2"
  PROMPT=32; GEN=8; CUT=2; PREFILL_LENGTHS=128,512; DEFER=1   # the tiny model uses 2 experts
  python3 -c "
import sys; sys.path.insert(0, 'tests')
from tiny_models import write_tiny_gguf
write_tiny_gguf('$D/tiny-2.gguf', 'qwen3moe', n_experts=8, n_used=2, n_layers=2, context_length=1024)
write_tiny_gguf('$D/tiny-cut.gguf', 'qwen3moe', n_experts=8, n_used=2, n_layers=2, context_length=1024)"
else
  MODELS=${MODELS:-qwen3-30b-a3b:48 deepseek-v2-lite:27}
  PROMPT=512; GEN=32; CUT=2; PREFILL_LENGTHS=512,4096; DEFER=${DEFER:-2}
fi

for spec in $MODELS; do
  IFS=: read -r shape layers <<< "$spec"
  m="$D/$shape-$layers.gguf"
  if [ "$shape" != tiny ]; then
    stage "gen-$shape" 60 120 python3 scripts/make_synthetic_gguf.py --shape "$shape" --layers "$layers" \
      --experts-qtype Q4_K "$m" || continue
    [ -f "$m" ] || continue
  fi
  profile=$(python3 -c "from ktjax.gguf.reader import GGUFFile; print(GGUFFile('$m').architecture)")
  # 1. experts all on the host, the rest on the GPU (the family's GPU profile)
  stage "ktjax-hybrid-$shape" 40 "${HYBRID_LIMIT:-130}" $BENCH --model "$m" --rules "$profile" --prompt-tokens $PROMPT \
    --gen-tokens $GEN --profile --batch 1,8
  if [ -n "${LLAMA_BIN:-}" ]; then
    stage "llama-ncmoe-all-$shape" 20 60 bash -c "$(llama_cmd "$m" "$layers")"
  fi
  stage "ktjax-cpu-$shape-b1" 40 100 env JAX_PLATFORMS=cpu $BENCH --model "$m" --rules cpu \
    --prompt-tokens $PROMPT --gen-tokens $GEN
  # the layer loop unrolled in the program (no `while` left out of the CUDA graph; 8 Dec: the
  # GPU part of the step was 187 us per layer at batch 1)
  stage "ktjax-hybrid-layers-$shape" 40 150 env KTJAX_COMMAND_BUFFERS=layers $BENCH --model "$m" \
    --rules "$profile" --prompt-tokens $PROMPT --gen-tokens $GEN --batch 1
  # The CUDA handlers, the captured step and the error path (skipped without a GPU), once.
  if [ -z "${TESTED:-}" ]; then
    TESTED=1 TAIL=12 stage gpu-tests 30 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hybrid.py
    TESTED=1
  fi
  # 3. outputs: hybrid vs all-GPU on a cut of the shape
  c="$D/$shape-cut.gguf"
  [ "$shape" = tiny ] && c="$D/tiny-cut.gguf"
  if [ "$shape" = tiny ] || stage "gen-cut-$shape" 30 40 python3 scripts/make_synthetic_gguf.py \
      --shape "$shape" --layers $CUT --experts-qtype Q4_K "$c"; then
    stage "agreement-$shape" 40 90 $BENCH --model "$c" --rules "$profile" --prompt-tokens 64 --gen-tokens 8 \
      --compare device --compare-tokens 256
  fi
  # prefill by token count: host experts vs every layer's experts streamed to the GPU
  # (experts: device_prefill_min_tokens), prompts of PREFILL_LENGTHS, to set the threshold
  cp "rules/$profile.yaml" "$D/stream.yaml"; printf 'experts:\n  device_prefill_min_tokens: 32\n' >> "$D/stream.yaml"
  for r in "$profile" "$D/stream.yaml"; do
    stage "prefill-$(basename "$r" .yaml)-$shape" 60 150 $BENCH --model "$m" --rules "$r" \
      --prefill-tokens "$PREFILL_LENGTHS"
  done
  # 2. the same partial placement in both: the experts of the last layers on the GPU
  n=$(( layers - ${GPU_LAYERS:-6} )); [ $n -lt 0 ] && n=0
  cp "rules/$profile.yaml" "$D/partial.yaml"; printf 'experts:\n  n_cpu_moe: %d\n' "$n" >> "$D/partial.yaml"
  stage "ktjax-partial-$shape" 50 90 $BENCH --model "$m" --rules "$D/partial.yaml" --prompt-tokens $PROMPT \
    --gen-tokens $GEN
  if [ -n "${LLAMA_BIN:-}" ]; then
    stage "llama-ncmoe-$n-$shape" 20 60 bash -c "$(llama_cmd "$m" "$n")"
    [ "$n" -gt 0 ] && stage "llama-ncmoe-0-$shape" 20 60 bash -c "$(llama_cmd "$m" 0)"
  fi
  # expert deferral: decode with each token's DEFER lowest-weighted host experts deferred
  cp "rules/$profile.yaml" "$D/defer.yaml"; printf 'experts:\n  defer: %d\n' "$DEFER" >> "$D/defer.yaml"
  stage "ktjax-defer$DEFER-$shape" 40 100 $BENCH --model "$m" --rules "$D/defer.yaml" \
    --prompt-tokens $PROMPT --gen-tokens $GEN --batch 1,8
  # its accuracy cost on a real MoE GGUF, if the machine has one (MOE_GGUF=path)
  if [ -n "${MOE_GGUF:-}" ] && [ -z "${DEFER_SCORED:-}" ]; then
    DEFER_SCORED=1
    stage "defer-accuracy" 60 150 python3 scripts/deferral_accuracy.py --model "$MOE_GGUF" \
      --defer 1,2,3 --json
  fi
  # prefill of one layer: host experts vs streaming the layer's experts to the GPU
  if [ "$shape" != tiny ]; then
    stage "prefill-probe-$shape" 25 45 python3 scripts/prefill_probe.py --shape "$shape" \
      --tokens 128,512,2048 --threads "$THREADS" --json
  fi
  # before: the synchronous bridge (pageable copies, two stream syncs per layer)
  stage "ktjax-syncbridge-$shape-b1" 40 90 env KTJAX_HOST_MOE_SYNC=1 $BENCH --model "$m" --rules "$profile" \
    --prompt-tokens $PROMPT --gen-tokens $GEN
  rm -f "$m" "$c"
done
write_json
log "done: $(wc -l < "$J") rows"

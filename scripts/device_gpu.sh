#!/usr/bin/env bash
# GPU path, side by side with llama.cpp CUDA (issue 27 sections 2-4); expected <= 240 s.
# Writes synthetic GGUFs of real shapes into /tmp, then on the same files: HBM bandwidth and
# the quantized matmul forms; SmolLM2-135M Q8_0 batch-1 decode (CUDA graph flags on and off);
# Llama-3-8B Q4_K batch 1/8/64 decode, prefill 2048 (TFLOPS) and the batch-1 step profile
# (kernels per step, gap to wall time); Llama-3-8B bf16 (8 of 32 layers: the roofline
# fraction does not depend on depth) batch 1; perplexity GPU vs CPU on the SmolLM2 shape.
# Each beside $LLAMA_BIN/llama-bench / llama-batched-bench (-ngl 99 -fa 1) when present.
# Writes $OUT/gpu.log (human log) and $OUT/gpu.json (figures).
# SMOKE=1: tiny shapes, runs anywhere (CPU too) to catch errors.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/gpu.log"; J="$OUT/gpu.jsonl"; : > "$LOG"; : > "$J"
export KTJAX_NO_PROGRESS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/scripts:${PYTHONPATH:-}
D=${SYN_DIR:-/tmp/ktjax-gpu}; mkdir -p "$D"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
LB=""; [ -n "${LLAMA_BIN:-}" ] && [ -x "$LLAMA_BIN/llama-bench" ] && LB="--llama-bench $LLAMA_BIN/llama-bench"
[ -z "$LB" ] && log "llama-bench not found (LLAMA_BIN=${LLAMA_BIN:-unset}): peer figures skipped"

# record NAME TIMEOUT CMD...: runs CMD, keeps its last JSON line in $J under NAME
record() {
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  local line
  line=$(timeout "$limit" "$@" 2> >(grep -v "^compiling" >> "$LOG") | tee -a "$LOG" | grep '^{' | tail -1)
  if [ -n "$line" ]; then echo "{\"$name\": $line}" >> "$J"; else log "$name: no result (timeout $limit s or error)"; fi
}

if [ "${SMOKE:-0}" = 1 ]; then
  SMALL="--shape smollm2-135m --layers 2"; BIG="--shape llama-tiny"; BIG_BF16="--shape llama-tiny"
  P=16; G=8; PF=64; BATCHES=1,4; MM="--n 512 --k 512 --rows 1,16 --calls 3 --repeats 1"; PPL_CTX=64
else
  SMALL="--shape smollm2-135m"; BIG="--shape llama3-8b"; BIG_BF16="--shape llama3-8b --layers 8"
  P=128; G=64; PF=2048; BATCHES=1,8,64; MM=""; PPL_CTX=256
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null | tee -a "$LOG"

python3 scripts/make_synthetic_gguf.py $SMALL --qtype Q8_0 "$D/small-q8.gguf" 2>&1 | tee -a "$LOG"
# the big files are written while the small model runs
( python3 scripts/make_synthetic_gguf.py $BIG --qtype Q4_K "$D/big-q4k.gguf" &&
  python3 scripts/make_synthetic_gguf.py $BIG_BF16 --qtype BF16 "$D/big-bf16.gguf" ) >> "$LOG" 2>&1 &
gen=$!

record quant_matmul 40 python3 scripts/bench_quant_matmul.py $MM --json
record small_q8_0 60 python3 scripts/bench_generate.py --model "$D/small-q8.gguf" --prompt-tokens $P \
  --gen-tokens $G --repeats 3 --roofline --profile-steps 10 $LB --json
KTJAX_COMMAND_BUFFERS=0 record small_q8_0_no_graphs 40 python3 scripts/bench_generate.py \
  --model "$D/small-q8.gguf" --prompt-tokens $P --gen-tokens $G --repeats 3 --json
wait $gen; log "big GGUFs written"; ls -la "$D" >> "$LOG"
record big_q4_k 110 python3 scripts/bench_generate.py --model "$D/big-q4k.gguf" --prompt-tokens $P \
  --gen-tokens $G --batch $BATCHES --prefill-tokens $PF --repeats 2 --roofline --profile-steps 10 $LB --json
record big_bf16_8_layers 45 python3 scripts/bench_generate.py --model "$D/big-bf16.gguf" \
  --prompt-tokens $P --gen-tokens $G --repeats 2 --roofline $LB --json
# perplexity: the GPU path (bf16) against the CPU path (float32, host kernels) on one text
for dev in gpu cpu; do
  env $( [ $dev = cpu ] && echo JAX_PLATFORMS=cpu ) timeout 60 python3 scripts/perplexity.py \
    "$D/small-q8.gguf" ARCHITECTURE.md --ctx $PPL_CTX --chunks 4 2>&1 | grep -v "^compiling" \
    | tee "$OUT/ppl-$dev.txt" | tail -1 | tee -a "$LOG"
done
python3 - "$J" "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, re, sys
out = {}
for line in open(sys.argv[1]):
    out.update(json.loads(line))
ppl = {}
for dev in ("gpu", "cpu"):
    m = re.search(r"PPL = ([\d.]+)", open(f"{sys.argv[2]}/ppl-{dev}.txt").read())
    if m:
        ppl[dev] = float(m.group(1))
if len(ppl) == 2:
    ppl["relative_difference"] = abs(ppl["gpu"] - ppl["cpu"]) / ppl["cpu"]
out["perplexity"] = ppl
json.dump(out, open(f"{sys.argv[2]}/gpu.json", "w"), indent=1)
for name, r in out.items():
    if isinstance(r, dict):
        for c in r.get("cases", []):
            print(f"{name} b={c['batch']}: {c['decode_tok_s']:.1f} tok/s, step {c['step_ms']:.2f} ms, "
                  f"roofline {c.get('decode_roofline_fraction', float('nan')):.2f}, "
                  f"x llama.cpp {c.get('decode_ratio', float('nan')):.2f}")
        if "prefill" in r:
            p = r["prefill"]
            print(f"{name} prefill {p['prefill_tokens']}: {p['prefill_tok_s']:.0f} tok/s, "
                  f"{p['tflops']:.1f} TFLOPS, x llama.cpp {p.get('prefill_ratio', float('nan')):.2f}")
        if "profile" in r:
            p = r["profile"]
            print(f"{name} profile: {p.get('kernels_per_step')} kernels/step, wall "
                  f"{p['wall_ms_per_step']:.3f} ms, gap {p.get('gap_fraction')}")
print("perplexity", ppl)
PY
rm -rf "$D"
log "done"

#!/usr/bin/env bash
# expected: ~240 s, at most 380 s (tests <= 200 s, prefix TTFT <= 150 s). SMOKE=1: tiny shapes on CPU.
# Scheduler, prefix cache and speculative decoding on the accelerator (jax 0.11, reference
# attention with packed mixed steps): their tests on the GPU, then time to first token with a
# 2,000-token shared system prompt on a SmolLM2-shaped random model. Every stage is bounded by
# `timeout` and runs whatever the previous one did; $OUT/sched.json is rewritten after each
# stage with what is known so far; $OUT/sched.log is the human log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export KTJAX_NO_PROGRESS=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
LOG="$OUT/sched.log"; JSON="$OUT/sched.json"; : > "$LOG"; echo '{}' > "$JSON"
record() {  # record KEY VALUE-JSON: merge one stage's result into $JSON
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d[sys.argv[2]]=json.loads(sys.argv[3]); json.dump(d,open(sys.argv[1],"w"))' \
    "$JSON" "$1" "$2" 2>>"$LOG" || echo "record $1 failed" >> "$LOG"
}
if [ "${SMOKE:-0}" = 1 ]; then LAYERS=2 SYSTEM=200 TESTS="tests/test_spec_decode.py -k ngram_lookup"
else LAYERS=30 SYSTEM=2000 TESTS="tests/test_scheduler.py tests/test_spec_decode.py"; fi
timeout 60 python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS > "$OUT/sched_tests.log" 2>&1
rc=$?; tail -15 "$OUT/sched_tests.log" | tee -a "$LOG"
record tests "{\"rc\": $rc, \"summary\": $(tail -1 "$OUT/sched_tests.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}"
timeout 120 python3 - "$LAYERS" <<'PY' 2>&1 | tee -a "$LOG"
import sys; sys.path.insert(0, "tests")
import gguf
from tiny_models import write_tiny_gguf
write_tiny_gguf("/tmp/sched-smollm2-shape.gguf", "llama", gguf.GGMLQuantizationType.Q8_0,
                n_layers=int(sys.argv[1]), hidden=576, n_heads=9, n_kv_heads=3, head_dim=64,
                ffn=1536, context_length=8192)
PY
if timeout 150 python3 scripts/bench_prefix.py --model /tmp/sched-smollm2-shape.gguf \
    --system-tokens "$SYSTEM" --repeats 3 --json 2>>"$LOG" | tail -1 > "$OUT/sched_prefix.json" \
    && [ -s "$OUT/sched_prefix.json" ]; then
  record prefix "$(cat "$OUT/sched_prefix.json")"
else
  record prefix '"failed or timed out (see sched.log)"'
fi
cat "$JSON" | tee -a "$LOG"

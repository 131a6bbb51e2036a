#!/usr/bin/env bash
# expected: ~240 s, at most 360 s (tests <= 200 s, prefix TTFT <= 150 s). SMOKE=1: tiny shapes on CPU.
# Scheduler, prefix cache and speculative decoding on the accelerator (jax 0.11, reference
# attention with packed mixed steps): their tests on the GPU, then time to first token with a
# 2,000-token shared system prompt on a SmolLM2-shaped random model. Writes $OUT/sched.*.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export KTJAX_NO_PROGRESS=1 PYTHONUNBUFFERED=1
LOG="$OUT/sched.log"; : > "$LOG"
if [ "${SMOKE:-0}" = 1 ]; then LAYERS=2 SYSTEM=200 TESTS="tests/test_spec_decode.py -k ngram_lookup"
else LAYERS=30 SYSTEM=2000 TESTS="tests/test_scheduler.py tests/test_spec_decode.py"; fi
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
timeout 200 python3 -m pytest -q $TESTS 2>&1 | tail -15 | tee -a "$LOG"
python3 - "$LAYERS" <<'PY' 2>&1 | tee -a "$LOG"
import sys; sys.path.insert(0, "tests")
import gguf
from tiny_models import write_tiny_gguf
write_tiny_gguf("/tmp/sched-smollm2-shape.gguf", "llama", gguf.GGMLQuantizationType.Q8_0,
                n_layers=int(sys.argv[1]), hidden=576, n_heads=9, n_kv_heads=3, head_dim=64,
                ffn=1536, context_length=8192)
PY
timeout 150 python3 scripts/bench_prefix.py --model /tmp/sched-smollm2-shape.gguf \
  --system-tokens "$SYSTEM" --repeats 3 --json 2>>"$LOG" | tail -1 > "$OUT/sched.json"
cat "$OUT/sched.json" | tee -a "$LOG"

#!/usr/bin/env bash
# expected: 150 s. The issue-31 families (glm4moe, gpt-oss MXFP4, YaRN Qwen3, Kimi-shaped
# deepseek2; tiny random models written to GGUF) on the GPU against transformers (CPU, float32):
# every weight on the GPU, then each family's default rules (routed experts in the host
# kernels, stream-ordered through the CUDA bridge, for glm4moe / deepseek2 / gpt-oss: its
# biases and clamped SwiGLU stored with the host expert sets).
# Needs the native module built and torch + transformers. Results: $OUT/models.log, $OUT/models.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1 PYTHONPATH=$PWD:$PWD/tests:${PYTHONPATH:-}
timeout 140 python3 scripts/check_new_families.py --out "$OUT/models.json" > "$OUT/models.log" 2>&1
echo "exit $?" >> "$OUT/models.log"

#!/usr/bin/env bash
# Foundation checks on the accelerator machine (jax 0.11 + CUDA, Python 3.12): build the
# native module there, run the model/engine tests on the GPU and the host-kernel tests on
# its CPU, and benchmark generation on a SmolLM2-shaped random model. Writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export KTJAX_NO_PROGRESS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L; python3 -c "import jax, sys; print(sys.version, jax.__version__, jax.devices())"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -m pytest -q -x tests/test_models.py tests/test_engine.py tests/test_sampler.py \
  tests/test_bad_input.py -k "not host_linears" 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
JAX_PLATFORMS=cpu python3 -m pytest -q tests/test_quants.py tests/test_ffi.py \
  tests/test_host_linear.py 2>&1 | tee "$OUT/cpu_tests.log" | tail -3
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
import gguf
from tiny_models import write_tiny_gguf
write_tiny_gguf("/tmp/smollm2-shape.gguf", "llama", gguf.GGMLQuantizationType.Q8_0, n_layers=30,
                hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, context_length=8192)
PY
for b in 1 8; do
  python3 scripts/bench_generate.py --model /tmp/smollm2-shape.gguf --prompt-tokens 128 \
    --gen-tokens 64 --batch $b --json 2>&1 | tail -1 | tee -a "$OUT/bench_gpu.jsonl"
done

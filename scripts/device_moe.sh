#!/usr/bin/env bash
# MoE decode/prefill on the accelerator machine's host CPU (16 cores with AMX), CPU only:
# build the native module, write synthetic GGUFs of real MoE shapes (random weights, experts
# Q4_K), run bench_generate on each and the roofline (active bytes per token ÷ measured read
# bandwidth; bench_generate --roofline also probes it right before each decode pass).
# carry: .whl (the gguf wheel). Results: $OUT/moe.jsonl (default /tmp/out).
# MOE_PROFILE=1 also writes each model's decode-step operation profile to $OUT/profile-*.txt.
# MOE_GPU=1 also benchmarks each model on the GPU with its family's default rules (routed
# experts in the host kernels through the CUDA bridge, the rest on the GPU): lines with "placement": "gpu+host".
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu KTJAX_NO_PROGRESS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
# Always (re)build, incrementally: a warm machine may hold a module built from other
# sources, whose stale bindings crashed the bandwidth probe once.
cmake -S . -B /tmp/kb -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/tmp/configure.log 2>&1 || { tail -20 /tmp/configure.log; exit 1; }
timeout 200 cmake --build /tmp/kb -j"$(nproc)" > /tmp/build.log 2>&1 || { grep -E "error" -A5 /tmp/build.log | head -40; exit 1; }
cp /tmp/kb/_native*.so ktjax/
echo "build $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
J="$OUT/moe.jsonl"
D=${SYN_DIR:-/tmp/syn}
mkdir -p "$D"
# shape:layers:experts-qtype:time limit (s) for the benchmark
for spec in ${MOE_RUNS:-qwen3-30b-a3b:48:Q4_K:120 deepseek-v2-lite:12:Q4_K:80 deepseek-v3:4:Q4_K:90}; do
  IFS=: read -r shape layers qt limit <<< "$spec"
  m="$D/$shape-$layers-$qt.gguf"
  timeout 120 python3 scripts/make_synthetic_gguf.py --shape "$shape" --layers "$layers" --experts-qtype "$qt" "$m" || continue
  timeout 60 python3 scripts/roofline.py "$m" --json | tee -a "$J"
  timeout "$limit" python3 scripts/bench_generate.py --model "$m" --prompt-tokens 128 --gen-tokens 32 \
    --repeats 3 --roofline --json 2>&1 | grep -v "^compiling" | tail -3 | tee -a "$J"
  if [ "${MOE_GPU:-0}" = 1 ]; then
    env -u JAX_PLATFORMS timeout "$limit" python3 scripts/bench_generate.py --model "$m" --prompt-tokens 128 \
      --gen-tokens 32 --repeats 1 --json 2>&1 | grep -v "^compiling" | tail -3 | sed 's/^{/{"placement": "gpu+host", /' | tee -a "$J"
  fi
  if [ "${MOE_PROFILE:-0}" = 1 ]; then
    timeout "$limit" python3 scripts/profile_step.py --model "$m" --steps 10 --top 30 \
      > "$OUT/profile-$shape-$layers.txt" 2>&1
  fi
  rm -f "$m"
  echo "$shape done at $(( $(date +%s) - t0 )) s"
done

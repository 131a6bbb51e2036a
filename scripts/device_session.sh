#!/usr/bin/env bash
# One call on the accelerator machine, fresh or warm, within BUDGET seconds (default 560): builds
# what is missing, then runs STAGES in order, each bounded by its own limit and by what is left.
# Every stage writes under /tmp/device-results/<stage>/; at the end that folder is tarred into
# $OUT/results.tgz (the device returns at most 8 files), with the llama.cpp build beside it in
# 15 MiB parts (lcb.tar.xz.*) once it exists, to carry to a later machine as .lcb/.
#
# Stages (issue):        tests   the gpu-marked tests and the engine on the Pallas backend (27, 28;
#                                TESTS_LIMIT s, default 190; TESTS_K: a pytest -k part)
#   export  MoE start-up cold / cache / artifacts (29)      hybrid  device_hybrid.sh (28)
#   gpu     device_gpu.sh, engine figures vs llama.cpp (27; GPU_LIMIT s, default 340)
#   attn    device_attn.sh (27)
#   quants  device_quants.sh (host kernels on AMX)
# Builds: wheels in .whl/ (the machine lacks gguf) into /tmp/site; ktjax/_native for this
# Python (all cores); llama.cpp CUDA (the peer of `hybrid` and `gpu`) per PEER: `build` (default)
# from .peers/llama.cpp-cuda (../shared/peers/pack_llamacpp_cuda.sh) in the background, in a session
# of its own so that it outlives the call and a next call on the warm machine finds it, at
# nice 19 beside the stages; unpacked instead from carried .lcb/lcb.tar.xz.* when present;
# `none`: no peer (so no compile loads the host a hybrid run measures).
# Carry: .whl, and .peers/llama.cpp-cuda (43 MB) or .lcb. Example:
#   STAGES="tests export hybrid" BUDGET=480 PEER=none bash scripts/device_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=/tmp/device-results; mkdir -p "$R"
STAGES=${STAGES:-tests export hybrid gpu attn}
BUDGET=${BUDGET:-560}
PEER=${PEER:-build}
export PYTHONUNBUFFERED=1 KTJAX_NO_PROGRESS=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(el) )); }
exec > >(tee -a "$R/session.log") 2>&1

if ls .whl/*.whl > /dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}

lcb_parts() { ls .lcb/lcb.tar.xz.* > /dev/null 2>&1; }
if [ ! -x /tmp/lcb/bin/llama-bench ] && [ ! -f /tmp/lcb.started ] && [ "$PEER" = build ]; then
  if lcb_parts; then
    mkdir -p /tmp/lcb && cat .lcb/lcb.tar.xz.* | tar xJ -C /tmp/lcb && echo "[$(el)s] llama.cpp unpacked"
  elif [ -f .peers/llama.cpp-cuda/build.sh ]; then
    touch /tmp/lcb.started
    # build.sh: pack_llamacpp_cuda.sh's (sm_90, llama-bench and llama-batched-bench, /tmp/lcb)
    setsid nohup nice -n 19 bash -c 'bash .peers/llama.cpp-cuda/build.sh > /tmp/lcb-session.log 2>&1
      echo $? > /tmp/lcb.rc' < /dev/null > /dev/null 2>&1 &
    echo "[$(el)s] llama.cpp build started in the background"
  else
    echo "[$(el)s] no llama.cpp: neither .lcb parts nor .peers/llama.cpp-cuda carried"
  fi
fi

if ! ls ktjax/_native."$(python3 -c 'import sys; print(sys.implementation.cache_tag)')"*.so > /dev/null 2>&1; then
  cmake -S . -B /tmp/ktb -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" > /tmp/ktb-configure.log 2>&1 &&
    cmake --build /tmp/ktb -j"$(nproc)" > /tmp/ktb-build.log 2>&1 && cp /tmp/ktb/_native*.so ktjax/ ||
    { echo "native build failed"; tail -30 /tmp/ktb-configure.log /tmp/ktb-build.log; }
fi
echo "[$(el)s] native module: $(ls ktjax/_native*.so 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null
echo "cores $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB memory"}')"

# llama_bin SECONDS: waits up to SECONDS for the background build, then exports LLAMA_BIN
llama_bin() {
  local n=0
  while [ -f /tmp/lcb.started ] && [ ! -f /tmp/lcb.rc ] && [ "$n" -lt "$1" ]; do sleep 5; n=$((n + 5)); done
  if [ -x /tmp/lcb/bin/llama-bench ]; then export LLAMA_BIN=/tmp/lcb/bin
  else unset LLAMA_BIN; echo "[$(el)s] llama.cpp not ready: $(tail -2 /tmp/lcb-build.log 2>/dev/null)"; fi
}
# run_stage NAME LIMIT CMD...: CMD with OUT=$R/NAME for at most min(LIMIT, what is left) s
run_stage() {
  local name=$1 limit=$2 l; shift 2
  l=$(left)
  if [ "$l" -lt 30 ]; then echo "[$(el)s] $name: skipped, ${l}s left"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  mkdir -p "$R/$name"
  echo "[$(el)s] $name (limit ${limit}s)"
  OUT="$R/$name" timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "[$(el)s] $name: exit $rc"
}
# The hybrid tests first (the attention tests ran before); each test bounded where the
# pytest-timeout plugin is there (7 Dec: one fitted-tiling test used up the stage's 190 s)
# (TESTS_K: a pytest -k expression to run a part; 8 Dec: the 49 took about 7.6 s each)
gpu_tests() {
  local per_test=""
  python3 -c "import pytest_timeout" 2> /dev/null && per_test="--timeout=60"
  python3 -m pytest -v -p no:cacheprovider -rs -m gpu --durations=15 $per_test \
    ${TESTS_K:+-k "$TESTS_K"} tests/test_hybrid.py \
    tests/test_device_quant.py tests/test_gpu_attention.py > "$OUT/gpu_marked.txt" 2>&1
  python3 -m pytest -v -p no:cacheprovider -k engine_generates tests/test_gpu_attention.py \
    > "$OUT/engine_pallas.txt" 2>&1
}

# hybrid and attn leave out their own test stages: the tests stage runs those tests
for stage in $STAGES; do
  case $stage in
    tests) run_stage tests "${TESTS_LIMIT:-190}" env TESTS_K="${TESTS_K:-}" \
      bash -c "$(declare -f gpu_tests); gpu_tests" ;;
    export) run_stage export 122 bash scripts/device_export.sh ;;
    hybrid) [ "$PEER" = build ] && llama_bin 60
      run_stage hybrid 560 env TESTED=1 BUDGET="$(( $(left) - 5 ))" bash scripts/device_hybrid.sh ;;
    gpu) [ "$PEER" = build ] && llama_bin 120
      g=${GPU_LIMIT:-340}; [ "$(left)" -lt "$g" ] && g=$(left)
      run_stage gpu "$g" env BUDGET="$(( g - 20 ))" bash scripts/device_gpu.sh ;;
    attn) run_stage attn 400 env SKIP="${SKIP:-1 5}" bash scripts/device_attn.sh ;;
    quants) run_stage quants 90 bash scripts/device_quants.sh ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "[$(el)s] stages done"
tar czf "$OUT/results.tgz" -C /tmp device-results
if [ -x /tmp/lcb/bin/llama-bench ] && ! lcb_parts; then  # the peer build, for a later machine
  (cd /tmp/lcb && tar cf - bin $(find . -name '*.so*' -not -path './bin/*')) | xz -T0 -6 |
    split -b 15M - "$OUT/lcb.tar.xz."
fi
echo "[$(el)s] end"

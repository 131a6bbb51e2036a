#!/usr/bin/env bash
# One batch for the accelerator machine's host CPU (16 cores with AMX): build the native
# module, run the host-kernel tests (AMX paths included), the MoE benchmarks, kt-kernel side
# by side when its modules were carried, and oneDNN's GEMM where PyTorch is installed.
#   carry: .whl (the gguf wheel), optionally .peers/ktk-dev (kt-kernel's _amx module, its
#   kt_kernel.libs and kt_moe_bench.py). Results go to $OUT (default /tmp/out). PART=decode or
#   PART=prefill runs half the benchmarks (each half fits one 10-minute device call).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)|NUMA|L2|L3"; grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; free -g | head -2; } > "$OUT/cpu.txt" 2>&1
t0=$(date +%s)
cmake -S . -B /tmp/kb -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/tmp/configure.log 2>&1 || { tail -20 /tmp/configure.log; exit 1; }
timeout 200 cmake --build /tmp/kb -j"$(nproc)" > /tmp/build.log 2>&1 || { grep -E "error" -A5 /tmp/build.log | head -40; exit 1; }
cp /tmp/kb/_native*.so ktjax/
echo "build $(( $(date +%s) - t0 )) s" | tee -a "$OUT/cpu.txt"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "from ktjax import _native as n; print('isa', n.detected_isa(), 'threads', n.num_threads())" | tee -a "$OUT/cpu.txt"

timeout 100 python3 -m pytest -q -p no:cacheprovider -x tests/test_host_amx.py tests/test_host_moe.py \
  tests/test_host_linear.py tests/test_thread_pool.py -k "amx or moe or 257 or ffi or pinned or numa" 2>&1 | tail -15 | tee "$OUT/pytest.txt"

B="$OUT/bench_moe.jsonl"
KT=$(ls .peers/ktk-dev/kt_kernel/_kt_kernel_ext_amx*.so 2>/dev/null | head -1)
kt_bench() {  # qlens
  [ -n "$KT" ] || return 0
  LD_LIBRARY_PATH=$PWD/.peers/ktk-dev/kt_kernel.libs:${LD_LIBRARY_PATH:-} QLENS=$1 \
    METHODS=AMXInt8_MOE,AMXBF16_MOE,AMXInt4_MOE BATCHED=1 \
    timeout 120 python3 .peers/ktk-dev/kt_moe_bench.py "$KT" 16 dsv3 2>&1 | grep "^kt " | tee -a "$OUT/ktkernel.txt"
}
# Each part fits one 10-minute call: PART=decode (qlen 1), PART=prefill (qlen 32 / 1024), or
# both. Layers rotate over 8x the L3 at the smallest qlen (bench_moe's default).
if [ "${PART:-all}" != prefill ]; then
  timeout 200 python3 scripts/bench_moe.py --shape deepseek-v3 --qlen 1 --format int8,int8_row,int4,bf16,q4_k --threads 16 \
    --experts 16 --min-time 0.3 --json --overhead | tee -a "$B"
  kt_bench 1,32  # kt-kernel needs the largest qlen to be a multiple of 32
  timeout 120 python3 scripts/bench_moe.py --shape qwen3-30b-a3b --qlen 1 --format int8,int4 --threads 16 \
    --experts 32 --min-time 0.3 --json | tee -a "$B"
fi
if [ "${PART:-all}" != decode ]; then
  # The AMX tile loop's own ceiling on this machine, one thread and all: the TOPS below against it.
  g++ -O2 -std=c++17 -mamx-tile -mamx-int8 -pthread -I. scripts/amx_peak.cpp -o /tmp/amx_peak &&
    { /tmp/amx_peak 1; /tmp/amx_peak "$(nproc)"; } | tee -a "$B"
  # 64 experts per layer, as kt_moe_bench's dsv3 shape.
  timeout 280 python3 scripts/bench_moe.py --shape deepseek-v3 --qlen 32,1024 --format int8,int8_row,int4,bf16,q4_k,q6_k \
    --threads 16 --experts 64 --min-time 0.3 --json | tee -a "$B"
  kt_bench 32,1024
  # The experts' GEMM shapes against Intel's AMX kernels (oneDNN; says so if PyTorch is missing).
  timeout 90 python3 scripts/bench_gemm_peers.py --rounds 3 | tee -a "$OUT/gemm_peers.jsonl"
  timeout 90 python3 scripts/bench_moe.py --shape qwen3-30b-a3b --qlen 32,1024 --format int8,int8_row,int4 --threads 16 \
    --experts 32 --min-time 0.3 --json | tee -a "$B"
fi
echo "total $(( $(date +%s) - t0 )) s"

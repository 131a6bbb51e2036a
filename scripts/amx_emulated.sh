#!/usr/bin/env bash
# Builds tests/amx_emulated.cpp with the AMX kernels' tile instructions emulated in software
# (cpu_kernels/amx/amx_emulation.h) and runs it: the AMX tile logic checked against the
# AVX-512 kernels on any AVX-512 CPU. Sanitized (ASan + UBSan): a tile load or store out of
# bounds is an emulated memcpy, so it is reported. Needs g++ (or CXX) and an AVX-512 CPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${KTJAX_AMX_EMULATED_DIR:-/tmp/ktjax-amx-emulated}
CXX=${CXX:-g++}
mkdir -p "$WORK"
# -Wno-maybe-uninitialized: GCC 12 flags its own AVX-512 headers under the sanitizers.
FLAGS="-std=c++17 -O2 -g -Wall -Wextra -Wno-maybe-uninitialized -fno-strict-aliasing -I$ROOT
  -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
AVX512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16 -mfma -mf16c"
objs=() pids=()
build() {  # source, flags
  local obj="$WORK/$(basename "$1" .cpp).o"
  $CXX $FLAGS "${@:2}" -c "$ROOT/$1" -o "$obj" &
  objs+=("$obj") pids+=($!)
}
build cpu_kernels/amx/linear_amx.cpp $AVX512 -DKTJAX_AMX_EMULATE
build cpu_kernels/avx512/linear_avx512.cpp $AVX512
build cpu_kernels/avx512/float_kernels_avx512.cpp $AVX512
build cpu_kernels/avx2/linear_avx2.cpp -mavx2 -mfma -mf16c
build cpu_kernels/avx2/float_kernels_avx2.cpp -mavx2 -mfma -mf16c
for src in generic/linear_generic generic/float_kernels_generic float_kernels linear/linear moe/moe formats/pack thread_pool numa quants/ggml_types \
           quants/dequant; do
  build "cpu_kernels/$src.cpp"
done
build tests/amx_emulated.cpp
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: stops at a failed compile
$CXX $FLAGS "${objs[@]}" -o "$WORK/amx_emulated" -lpthread
"$WORK/amx_emulated"

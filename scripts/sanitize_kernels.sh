#!/usr/bin/env bash
# Builds the native module with AddressSanitizer + UndefinedBehaviorSanitizer and runs the
# host-kernel, dequantizer, FFI and bad-input tests (crafted and fuzzed model files included:
# the fuzz test's worker processes inherit the preloaded runtimes) against that build (not
# the installed one).
#   scripts/sanitize_kernels.sh [pytest args...]      e.g.  -k "Q4_K or moe"
# The sanitized module is loaded into a python started without site hooks (-S), so the
# editable install's import hook cannot substitute the normal build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# One build folder per checkout: a CMake cache refuses a second source tree.
WORK=${KTJAX_SANITIZE_DIR:-/tmp/ktjax-sanitize/$(printf %s "$ROOT" | cksum | cut -d" " -f1)}
PY=${PYTHON:-python3}
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$WORK/build" "$WORK/pkg"
cmake -S "$ROOT" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
  >"$WORK/configure.log"
cmake --build "$WORK/build" -j"$(nproc)"
rm -rf "$WORK/pkg/ktjax"
cp -r "$ROOT/ktjax" "$WORK/pkg/ktjax"
cp "$WORK"/build/_native*.so "$WORK/pkg/ktjax/"
cp -r "$ROOT/rules" "$WORK/pkg/ktjax/_rules"  # where an installed wheel has them (model loads)
# Python itself is not instrumented: preload the runtimes; jaxlib's own allocations make
# leak and ODR reports noise, so only memory errors and UB in our code fail the run.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0:alloc_dealloc_mismatch=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$WORK/pkg:$ROOT/tests:$SITE"
cd "$WORK"  # not the repo root: python puts the working directory first on sys.path
"$PY" -S -c "import ktjax._native as n; assert n.__file__.startswith('$WORK'), n.__file__"
"$PY" -S -m pytest -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -q \
  "$ROOT/tests/test_host_linear.py" "$ROOT/tests/test_host_moe.py" \
  "$ROOT/tests/test_cpu_attention.py" "$ROOT/tests/test_stacked_matvec.py" \
  "$ROOT/tests/test_sampler.py" "$ROOT/tests/test_quants.py" "$ROOT/tests/test_ffi.py" \
  "$ROOT/tests/test_bad_input.py" "$ROOT/tests/test_crafted_gguf.py" \
  "$ROOT/tests/test_fuzz_gguf.py" "$ROOT/tests/test_packed_weights_io.py" \
  "$ROOT/tests/test_iq_host.py" "$ROOT/tests/test_iq_quants.py" \
  "$ROOT/tests/test_host_moe_epilogue.py" "$@"

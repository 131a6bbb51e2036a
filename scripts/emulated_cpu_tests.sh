#!/usr/bin/env bash
# Runs the host-kernel and real-model tests on an emulated CPU without AVX-512 (qemu-user's
# TCG), so that an instruction above the CPU's level anywhere on its dispatch path is a
# SIGILL here, whatever CPU runs CI (issue 25).
#   scripts/emulated_cpu_tests.sh [pytest args...]
# KTJAX_EMULATED_CPU picks the qemu model (default EPYC-Milan: Zen 3, AVX2 + FMA + F16C, no
# AVX-512); the tests' own subprocesses run under the same model (tests/isa_levels.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CPU=${KTJAX_EMULATED_CPU:-EPYC-Milan}
PY=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')  # the interpreter, not a shim
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 missing: apt-get install qemu-user" >&2; exit 1; }
export KTJAX_EMULATOR="qemu-x86_64 -cpu $CPU"
# TCG lacks a few of the model's system features (xsaves, invpcid, ...): its warnings are noise.
emulate() { $KTJAX_EMULATOR "$PY" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
cd "$ROOT"
# Import the installed ktjax (with its built module), not the source tree in the cwd.
export PYTHONSAFEPATH=1
emulate -c "from ktjax import _native as n; print('emulated $CPU: ktjax detects', n.detected_isa())"
emulate -m pytest -p no:cacheprovider -q "$@"

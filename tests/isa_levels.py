"""The host-kernel ISA levels this machine can run, lowest first (AMX only where the CPU has
it); kernel tests compare each against its reference."""
import os
import shlex
import sys

from ktjax import _native

ISA_ORDER = ["generic", "avx2", "avx512", "amx"]
ISAS = ISA_ORDER[: ISA_ORDER.index(_native.detected_isa()) + 1]
SIMD_ISAS = [i for i in ISAS if i != "generic"]

# Command that starts Python on the CPU this process runs on: under
# scripts/emulated_cpu_tests.sh, KTJAX_EMULATOR is its qemu command (a child started plainly
# would run on the host's CPU).
PYTHON = [*shlex.split(os.environ.get("KTJAX_EMULATOR", "")), sys.executable]

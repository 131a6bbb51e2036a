"""The host-kernel ISA levels this machine can run, lowest first (AMX only where the CPU has
it); kernel tests compare each against its reference."""
from ktjax import _native

ISA_ORDER = ["generic", "avx2", "avx512", "amx"]
ISAS = ISA_ORDER[: ISA_ORDER.index(_native.detected_isa()) + 1]
SIMD_ISAS = [i for i in ISAS if i != "generic"]

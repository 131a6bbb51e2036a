"""ISA isolation of the built module (issue 25): no function that AVX2 or generic code can
reach holds AVX-512 or AMX instructions, and no AVX code sits outside the AVX2+ units
(scripts/check_isa_isolation.py). The checker itself is shown to catch the bug it exists
for, on a small library built here the way the bug arose."""
import functools
import importlib.util
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from isa_levels import SIMD_ISAS

from ktjax import _native
from ktjax.host import linear as hl

ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.cache
def _checker():
    spec = importlib.util.spec_from_file_location("check_isa_isolation", ROOT / "scripts" / "check_isa_isolation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_native_module_keeps_each_isa_in_its_units():
    found = _checker().violations(_native.__file__, str(ROOT))
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_prefill_tiles_grow_their_scratch(isa):
    """The reproducer of issue 25: prefill tiles over Q5_0 weights (int4 + a bit plane) unpack
    into a per-thread scratch buffer that grows, copying its old bytes, with each larger K.
    The starting module's AVX2 path grew it with an AVX-512 copy loop: SIGILL on AVX2 CPUs,
    which scripts/emulated_cpu_tests.sh runs this on."""
    rng = np.random.default_rng(0)
    for k in (256, 512, 1024, 2048, 4096):
        w = rng.standard_normal((32, k)).astype(np.float32)
        raw = np.frombuffer(quants.quantize(w, GGMLQuantizationType.Q5_0).tobytes(), np.uint8)
        h = hl.pack_gguf_weight(raw, int(GGMLQuantizationType.Q5_0), (32, k))
        try:
            x = rng.standard_normal((16, k)).astype(np.float32)
            ref = hl.linear_reference(x, h, like=isa)
            np.testing.assert_allclose(hl.linear_forward(x, h, isa), ref, rtol=1e-4,
                                       atol=1e-4 * float(np.abs(ref).max()))
        finally:
            hl.release(h)


# A shared inline function (the vector-growing routine of the bug, reduced): one unit compiled
# with AVX-512 flags and one baseline unit both define it; the linker keeps one body.
_SHARED = """
#include <cstddef>
#include <cstring>
{open}
inline void copy_rows(char* d, const char* s, size_t n) {{
  for (size_t i = 0; i < n; ++i) d[i] = s[i] + 1;
}}
{close}
"""
_UNIT = """
#include "shared.h"
{using}
void {name}(char* d, const char* s, size_t n) {{ copy_rows(d, s, n); }}
"""


def _build(tmp: pathlib.Path, local: bool) -> pathlib.Path:
    """lib.so from avx512/unit_avx512.cpp (AVX-512 flags, linked first) and generic/unit.cpp."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no C++ compiler to build the checker's fixture (the project's build needs one too)")
    (tmp / "cpu_kernels" / "avx512").mkdir(parents=True)
    (tmp / "cpu_kernels" / "generic").mkdir(parents=True)
    wrap = {"open": "namespace {", "close": "}"} if local else {"open": "", "close": ""}
    (tmp / "shared.h").write_text(_SHARED.format(**wrap))
    units = [(tmp / "cpu_kernels" / "avx512" / "unit_avx512.cpp", "copy_avx512",
              ["-mavx512f", "-mavx512bw", "-mprefer-vector-width=512"]),
             (tmp / "cpu_kernels" / "generic" / "unit.cpp", "copy_generic", [])]
    objs = []
    for src, name, flags in units:
        src.write_text(_UNIT.format(name=name, using=""))
        obj = src.with_suffix(".o")
        # -fno-inline: the shared function stays a call, as a large one does at -O3.
        subprocess.run([cxx, "-O3", "-fno-inline", "-fPIC", "-I", str(tmp), *flags, "-c", str(src), "-o", str(obj)],
                       check=True)
        objs.append(str(obj))
    lib = tmp / "lib.so"
    subprocess.run([cxx, "-shared", "-o", str(lib), *objs], check=True)
    return lib


def test_checker_catches_a_shared_inline_function_compiled_for_avx512(tmp_path):
    found = _checker().violations(str(_build(tmp_path, local=False)), str(tmp_path))
    assert len(found) == 1 and "copy_rows" in found[0] and "avx512 code" in found[0], found


def test_checker_accepts_the_same_function_with_internal_linkage(tmp_path):
    assert _checker().violations(str(_build(tmp_path, local=True)), str(tmp_path)) == []


def test_checker_refuses_a_stripped_module(tmp_path):
    lib = _build(tmp_path, local=True)
    subprocess.run(["strip", str(lib)], check=True)
    with pytest.raises(SystemExit, match="stripped"):
        _checker().violations(str(lib), str(tmp_path))

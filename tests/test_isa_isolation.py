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

import pytest

from ktjax import _native

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

#!/usr/bin/env python3
"""Proves over a built module that no code a lower ISA level can run holds higher-level instructions.

Every function of the module is disassembled (objdump) and given the level of its highest
instruction: AMX (tile instructions), AVX-512 (EVEX-encoded, zmm or mask registers), AVX2
(VEX-encoded: AVX, AVX2, FMA, F16C) or generic. It must not exceed the level of the unit that
owns it:
- a local symbol belongs to the translation unit named by the FILE symbol before it in the
  symbol table; units under an amx/, avx512/ or avx2/ folder have that level (CMakeLists.txt
  compiles them with those flags), every other unit is generic;
- a global or weak symbol (shared by every unit: the linker keeps one copy of an inline or
  template function for all callers; hidden ones are listed as locals after an unnamed FILE
  symbol) must name its level in its own qualified name, template arguments and parameters
  aside (`ktjax::kernels_avx512()`, `ktjax::amx_tile_peak_tops`);
  `std::vector<...>::_M_default_append` holding zmm code is the bug this check exists for;
- a target_clones variant (`[clone .avx2]`) has its target's level: the IFUNC resolver picks it
  only on a CPU that has it;
- code outside any function symbol is generic.
The dispatch reaches a unit only on a CPU of its level (cpu_kernels/isa.h), so this proves that
an AVX2 or generic CPU never executes an instruction it lacks. A stripped module (no .symtab)
cannot be checked; one linked with LTO (units merged, FILE symbols unnamed) fails.

Usage: check_isa_isolation.py [MODULE.so] [--sources ROOT]   (exit status 1 on a violation)
"""
from __future__ import annotations

import argparse
import bisect
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

LEVELS = ("generic", "avx2", "avx512", "amx")
GENERIC, AVX2, AVX512, AMX = range(4)
# Folders whose sources CMakeLists.txt compiles with an ISA's flags.
UNIT_FOLDERS = {"amx": AMX, "avx512": AVX512, "avx2": AVX2}
# A level named as a word of a qualified name: ktjax::kernels_avx2, amx_emu::loadd.
NAME_MARKER = re.compile(r"(?:^|[^A-Za-z0-9])(amx|avx512|avx2)(?![0-9])")
LEGACY_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3}
EVEX_OPERAND = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{%k|\{z\}")
# GCC's target_clones variants: `f(...) [clone .avx2]`, dispatched at load by an IFUNC resolver.
TARGET_CLONE = re.compile(r"\[clone \.(avx512\w*|avx2|fma|amx\w*)\]")
AMX_MNEMONIC = re.compile(r"^(ldtilecfg|sttilecfg|tile\w+|tdp\w+)$")


@dataclass
class Function:
    name: str
    start: int
    end: int
    owner: int  # the owning unit's level
    owner_text: str
    level: int = GENERIC
    example: str = ""
    aliases: list = field(default_factory=list)


def source_unit_levels(root: str) -> dict[str, int]:
    """Basename of every C++ source -> its unit's level (basenames must be unique: FILE
    symbols carry only the basename)."""
    levels: dict[str, int] = {}
    for top in ("cpu_kernels", "xla_ffi"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            parts = os.path.relpath(dirpath, root).split(os.sep)
            level = max([UNIT_FOLDERS.get(p, GENERIC) for p in parts])
            for f in files:
                if f.endswith(".cpp"):
                    if f in levels:
                        raise SystemExit(f"two sources named {f}: FILE symbols could not tell them apart")
                    levels[f] = level
    if not levels:
        raise SystemExit(f"no sources under {root}/cpu_kernels")
    return levels


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def strip_templates(name: str) -> str:
    """The qualified name without template arguments and parameter lists."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def clone_level(target: str) -> int:
    return AVX512 if target.startswith("avx512") else AMX if target.startswith("amx") else AVX2


def name_level(demangled: str) -> int:
    found = NAME_MARKER.findall(strip_templates(demangled))
    return max((LEVELS.index(m) for m in found), default=GENERIC)


def read_functions(module: str, units: dict[str, int]) -> list[Function]:
    """FUNC symbols of .symtab, in table order, each with its owner's level."""
    if ".symtab" not in run("readelf", "-SW", module):
        raise SystemExit(f"{module} is stripped (no .symtab): its functions cannot be attributed")
    rows = []  # (value, size, type, bind, name)
    for line in run("readelf", "-sW", "--symbols", module).splitlines():
        m = re.match(r"\s*\d+:\s+([0-9a-f]+)\s+(\d+|0x[0-9a-f]+)\s+(\w+)\s+(\w+)\s+\w+\s+(\S+)\s+(.*)$", line)
        if m:
            size = int(m.group(2), 0)
            rows.append((int(m.group(1), 16), size, m.group(3), m.group(4), m.group(5), m.group(6)))
    if not any(t == "FILE" for _, _, t, _, _, _ in rows):
        raise SystemExit(f"{module} has no FILE symbols (linked with LTO?): units cannot be told apart")
    raw = [r for r in rows if r[2] in ("FUNC", "IFUNC") and r[4] != "UND" and r[1] > 0]
    demangled = run("c++filt", *[r[5].split("@")[0] for r in raw]).splitlines() if raw else []
    current_file, funcs = "", []
    di = 0
    for value, size, typ, bind, ndx, name in rows:
        if typ == "FILE":
            current_file = name
            continue
        if not (typ in ("FUNC", "IFUNC") and ndx != "UND" and size > 0):
            continue
        pretty = demangled[di]
        di += 1
        if bind == "LOCAL" and current_file:
            owner, text = units.get(current_file, GENERIC), f"local in {current_file}"
        else:  # the linker lists hidden globals as locals after an unnamed FILE symbol
            owner, text = name_level(pretty), "global symbol"
        clone = TARGET_CLONE.search(pretty)
        if clone:  # a target_clones variant: the IFUNC resolver picks it only on its CPU
            owner, text = max(owner, clone_level(clone.group(1))), f"{text}, target clone"
        funcs.append(Function(pretty, value, value + size, owner, text))
    # Aliases (same start) merge; the highest owner level would hide nothing: keep the lowest.
    by_start: dict[int, Function] = {}
    for f in funcs:
        if f.start in by_start:
            kept = by_start[f.start]
            kept.aliases.append(f.name)
            if f.owner < kept.owner:
                kept.owner, kept.owner_text = f.owner, f.owner_text
        else:
            by_start[f.start] = f
    return sorted(by_start.values(), key=lambda f: f.start)


def instruction_level(hexbytes: list[str], mnemonic: str, operands: str) -> int:
    if AMX_MNEMONIC.match(mnemonic):
        return AMX
    i = 0
    while i < len(hexbytes) and int(hexbytes[i], 16) in LEGACY_PREFIXES:
        i += 1
    first = int(hexbytes[i], 16) if i < len(hexbytes) else 0
    if first == 0x62 or EVEX_OPERAND.search(operands):  # 0x62 (BOUND) is EVEX in 64-bit mode
        return AVX512
    if first in (0xC4, 0xC5):  # VEX (LES/LDS are invalid in 64-bit mode)
        return AVX2
    return GENERIC


def classify(module: str, funcs: list[Function]) -> list[Function]:
    """Sets each function's level; returns pseudo-functions for code outside any symbol."""
    starts = [f.start for f in funcs]
    stray: dict[str, Function] = {}
    insn = re.compile(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(\S+)\s*(.*)$")
    for line in run("objdump", "-d", "-w", module).splitlines():
        m = insn.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        mnemonic, operands = m.group(3), m.group(4)
        if mnemonic in ("data16", "cs", "ds", "rex", "lock", "rep", "repz", "repnz", "bnd", "notrack"):
            parts = operands.split(None, 1)  # a prefix printed as its own word
            mnemonic, operands = (parts[0], parts[1] if len(parts) > 1 else "") if parts else (mnemonic, "")
        level = instruction_level(m.group(2).split(), mnemonic, operands)
        if level == GENERIC:
            continue
        k = bisect.bisect_right(starts, addr) - 1
        f = funcs[k] if k >= 0 and funcs[k].start <= addr < funcs[k].end else None
        if f is None:
            section = f"<code at {addr:#x} outside any function symbol>"
            f = stray.setdefault(section, Function(section, addr, addr + 1, GENERIC, "no symbol"))
        if level > f.level:
            f.level, f.example = level, f"{addr:#x}: {mnemonic} {operands}".strip()
    return list(stray.values())


def violations(module: str, root: str) -> list[str]:
    units = source_unit_levels(root)
    funcs = read_functions(module, units)
    stray = classify(module, funcs)
    out = []
    for f in funcs + stray:
        if f.level > f.owner:
            out.append(f"{LEVELS[f.level]} code in {f.name} ({f.owner_text}, allowed {LEVELS[f.owner]}): {f.example}")
    return out


def default_module() -> str:
    import importlib.util

    spec = importlib.util.find_spec("ktjax._native")
    if spec is None or not spec.origin:
        raise SystemExit("ktjax._native not found: pass the module's path")
    return spec.origin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("module", nargs="?", help="the built _native*.so (default: ktjax._native's)")
    ap.add_argument("--sources", default=os.path.join(os.path.dirname(__file__), ".."),
                    help="source root holding cpu_kernels/ (default: this checkout)")
    args = ap.parse_args()
    module = args.module or default_module()
    found = violations(module, args.sources)
    for v in found:
        print(v)
    print(f"{module}: {len(found)} function(s) hold instructions above their unit's level"
          if found else f"{module}: every function stays within its unit's ISA level")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

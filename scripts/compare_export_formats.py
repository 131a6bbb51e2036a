"""One step program two ways: jax.experimental.serialize_executable (machine code, what
`ktjax export` writes) against jax.export (StableHLO, compiled again where it is loaded).
Prints bytes and the seconds to write, and to get a callable back in this process.

  python scripts/compare_export_formats.py --model smollm2-135m
"""
from __future__ import annotations

import argparse
import re
import time

import jax
from jax.experimental import serialize_executable

from ktjax import LLM
from ktjax.engine.buckets import Bucket
from ktjax.engine.programs import Greedy, batch_spec
from ktjax.host.ffi import register_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-model-len", type=int, default=512)
    a = ap.parse_args()
    llm = LLM(a.model, max_model_len=a.max_model_len)
    jax.config.update("jax_enable_compilation_cache", False)  # every compile below is real
    programs = llm.engine.programs
    key = ("step", Bucket(1, 1, 8), Greedy(False))
    args = (programs._params_spec, programs._kv_spec, batch_spec(key[1]))

    t = time.perf_counter()
    compiled = programs.lower(key).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
    ser_s = time.perf_counter() - t
    t = time.perf_counter()
    serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    load_exe_s = time.perf_counter() - t

    register_targets()
    targets = sorted(set(re.findall(r"@(ktjax_\w+)", programs.lower(key).as_text())))
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
    # jax.export serializes pytrees of registered types only: the same program over the flat
    # list of leaves (the weight handles are constants inside it either way)
    leaves, tree = jax.tree.flatten(args)
    flat = jax.jit(lambda *xs: jax.tree.leaves(programs._greedy(*jax.tree.unflatten(tree, xs),
                                                                 False)))
    t = time.perf_counter()
    hlo = jax.export.export(flat, disabled_checks=checks)(*leaves).serialize()
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    back = jax.export.deserialize(hlo)
    jax.jit(back.call).lower(*leaves).compile()
    load_hlo_s = time.perf_counter() - t
    print(f"program: {key[1]} {key[2]}; compile from scratch {compile_s:.2f} s")
    print(f"serialize_executable: {len(blob) / 1024:.0f} KiB, write {ser_s:.3f} s, "
          f"load {load_exe_s:.3f} s (no compiler)")
    print(f"jax.export:           {len(hlo) / 1024:.0f} KiB, write {export_s:.3f} s, "
          f"load {load_hlo_s:.3f} s (deserialize + compile)")


if __name__ == "__main__":
    main()

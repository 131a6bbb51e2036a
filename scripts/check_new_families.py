#!/usr/bin/env python
"""The issue-31 families on whatever device JAX has (the GPU on the accelerator machine):
tiny random glm4moe, gpt-oss (MXFP4 experts), YaRN Qwen3 and Kimi-K2-shaped deepseek2
models, written to GGUF as the tests do; ktjax's logits (every weight on the device, float32,
then the family's default rules: routed experts in the host kernels)
against transformers on the CPU in float32. Writes a JSON line per model and placement.

  PYTHONPATH=.:tests python scripts/check_new_families.py --out /tmp/models.json
  PYTHONPATH=.:tests python scripts/check_new_families.py --write-ggufs /tmp/models_ppl
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def models(mtp: bool = True):
    import gguf
    from deepseek_models import hf_deepseek, write_deepseek_gguf
    from hf_gguf_models import (hf_glm4moe, hf_gpt_oss, hf_qwen3_yarn, write_glm4moe_gguf,
                                write_gpt_oss_gguf, write_qwen3_gguf)

    def gpt_oss_mxfp4(path):
        import torch
        m, t = hf_gpt_oss(), gguf.GGMLQuantizationType.MXFP4
        with torch.no_grad():   # transformers runs the experts MXFP4 holds
            for layer in m.model.layers:
                for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    w = p.detach().numpy().transpose(0, 2, 1)
                    deq = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
                    p.copy_(torch.from_numpy(deq.reshape(w.shape).transpose(0, 2, 1).copy()))
        return m, write_gpt_oss_gguf(path, m, expert_qtype=t)

    def glm(path):
        m = hf_glm4moe(qk_norm=True, yarn=True)
        return m, write_glm4moe_gguf(path, m, mtp_layer=mtp)

    def qwen3(path):
        m = hf_qwen3_yarn()
        return m, write_qwen3_gguf(path, m)

    def kimi(path):
        m = hf_deepseek(3, n_layers=2, n_routed_experts=384, num_experts_per_tok=8, n_group=1,
                        topk_group=1, routed_scaling_factor=2.827, moe_intermediate_size=8,
                        yarn=True)
        return m, write_deepseek_gguf(path, m, split_kv_b=True, mtp_layer=mtp)

    return {"glm4moe": (glm, "glm4moe"), "gpt-oss-mxfp4": (gpt_oss_mxfp4, "gpt-oss"),
            "qwen3-yarn": (qwen3, None), "kimi-k2-shape": (kimi, "deepseek2")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--write-ggufs", metavar="DIR",
                    help="only write the four files to DIR, without MTP layers (llama.cpp "
                         "refuses the tests' partial ones), for llama-perplexity")
    a = ap.parse_args()
    if a.write_ggufs:
        Path(a.write_ggufs).mkdir(parents=True, exist_ok=True)
        for name, (build, _) in models(mtp=False).items():
            print(build(Path(a.write_ggufs) / f"{name}.gguf")[1])
        return
    if not a.out:
        ap.error("--out is required")
    import jax
    from reference import hf_run, ktjax_logits

    ids = np.random.default_rng(3).integers(3, 259, 40)
    platform = jax.devices()[0].platform
    with tempfile.TemporaryDirectory() as tmp, open(a.out, "w") as out:
        def emit(row: dict) -> None:   # line by line: a later failure keeps the rows so far
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()

        for name, (build, profile) in models().items():
            try:
                model, path = build(Path(tmp) / f"{name}.gguf")
                ref = hf_run(model, ids)
            except Exception as e:  # noqa: BLE001 (report and go on with the next model)
                emit({"model": name, "error": f"building the model: {e!r}"[:500]})
                continue
            for rules in ("device", profile):
                if rules is None:
                    continue
                t0 = time.perf_counter()
                try:
                    ours = ktjax_logits(path, ids, rules)
                except Exception as e:  # noqa: BLE001
                    emit({"model": name, "rules": rules, "platform": platform,
                          "error": repr(e)[:500]})
                    continue
                emit({"model": name, "rules": rules, "platform": platform,
                      "max_abs_diff": float(np.abs(ours - ref).max()),
                      "max_abs_logit": float(np.abs(ref).max()),
                      "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
                      "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()

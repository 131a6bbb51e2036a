"""DeepSeek-V2/V3 (`deepseek2`): logits and 32 greedy tokens against transformers'
DeepseekV2/V3 on tiny random models written to GGUF (both kv_b layouts, q LoRA or not, YaRN,
softmax/group-max and sigmoid/bias/top-2-group routing); the latent cache; host placement;
unsupported configs."""
import numpy as np
import pytest

from deepseek_models import hf_deepseek, write_deepseek_gguf
from ktjax import LLM, SamplingParams
from ktjax import rules as placement_rules
from ktjax.errors import RulesError, UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from reference import ktjax_logits
from test_models import IDS

CASES = {  # name: (version, hf kwargs, split kv_b)
    "v2-lite": (2, dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1), False),
    "v2-groups-yarn": (2, dict(yarn=True), True),
    "v3-yarn": (3, dict(yarn=True), True),
    "v3-kv_b": (3, {}, False),
}


def _write(tmp_path, case):
    version, kw, split = CASES[case]
    model = hf_deepseek(version, **kw)
    return model, write_deepseek_gguf(tmp_path / f"{case}.gguf", model, split_kv_b=split)


def _hf_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    model, path = _write(tmp_path, case)
    ours, ref = ktjax_logits(path, IDS), _hf_logits(model, IDS)
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_kimi_k2_shape_and_mtp_layer(tmp_path):
    """Kimi-K2's routing (384 experts, 8 used, one group, sigmoid + bias, scaling 2.827) and a
    DeepSeek-V3 file that keeps its multi-token-prediction layer: that layer is not loaded,
    the trunk's logits match transformers."""
    model = hf_deepseek(3, n_layers=2, n_routed_experts=384, num_experts_per_tok=8,
                        n_group=1, topk_group=1, routed_scaling_factor=2.827,
                        moe_intermediate_size=8)
    path = write_deepseek_gguf(tmp_path / "kimi.gguf", model, split_kv_b=True, mtp_layer=True)
    spec = loader.inspect(GGUFFile(path))
    assert (spec.config.n_layers, spec.config.moe.n_experts) == (2, 384)
    ours, ref = ktjax_logits(path, IDS), _hf_logits(model, IDS)
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_greedy_32_tokens_and_latent_cache(tmp_path):
    """Prefill then 32 decode steps over the paged latent cache (absorbed attention)."""
    import torch

    model, path = _write(tmp_path, "v3-yarn")
    prompt = [int(t) for t in IDS[:8]]
    llm = LLM(str(path), host_linears=False, dtype="float32", max_model_len=64)
    cfg = llm.config
    assert llm.engine.kv.k.shape[-2:] == (1, cfg.kv_lora_rank + cfg.qk_rope_dim)
    assert llm.engine.kv.v.shape[-1] == 0
    latent, expanded = cfg.cache_bytes_per_token(4)
    assert (latent, expanded) == (3 * 40 * 4, 3 * 4 * (24 + 16) * 4)
    ours = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0,
                                               ignore_eos=True))[0].token_ids
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                         do_sample=False)[0, len(prompt):].tolist()
    assert list(ours) == ref


def test_cpu_profile_host_kernels(tmp_path):
    """The CPU default: matrices and routed experts in the host kernels (int8 activations),
    MLA up-projections in XLA; within the activation quantization error of the all-device
    logits (about 5% of the largest logit here; qwen3moe's tiny model is further off)."""
    _, path = _write(tmp_path, "v3-kv_b")
    device, host = ktjax_logits(path, IDS), ktjax_logits(path, IDS, "cpu")
    assert np.abs(device - host).max() < 0.1 * np.abs(device).max()
    assert (device.argmax(-1) == host.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("case,name", [("v3-kv_b", "attn_kv_b"), ("v3-yarn", "attn_k_b")])
def test_mla_up_projections_stay_on_the_device(tmp_path, case, name):
    """The table declares MLA's up-projections per-head weights (absorbed in XLA), so a rule
    placing them on the host is refused while placing, naming the rule and the tensor."""
    _, path = _write(tmp_path, case)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n"
                     "- {match: 'token_embd\\.weight|.*norm\\.weight|.*\\.bias|.*gate_inp.*', "
                     "placement: device, format: keep}\n"
                     "- {name: rest, match: '.*', placement: host, format: keep}\n")
    f = GGUFFile(path)
    spec = loader.inspect(f)
    with pytest.raises(RulesError, match=rf"rule 1 \('rest'\) places 'blk\.0\.{name}\.weight' "
                                         r"\(per_head\) on the host"):
        placement_rules.place(f, spec.table, spec.config.n_layers, rules, "cpu")


@pytest.mark.parametrize("metadata,match", [
    ({"expert_gating_func": 3}, r"deepseek2\.expert_gating_func = 3"),
    ({"expert_group_count": 3}, r"deepseek2\.expert_group_count = 3.*does not divide"),
    ({"expert_group_used_count": 5}, r"deepseek2\.expert_group_used_count = 5"),
    ({"expert_group_count": 8, "expert_group_used_count": 1},
     r"expert_group_used_count = 1: its groups hold fewer than 2"),
    ({"rope.scaling.type": "longrope"}, r"deepseek2\.rope\.scaling\.type = 'longrope'"),
    ({"leading_dense_block_count": 3}, r"deepseek2\.leading_dense_block_count = 3"),
])
def test_unsupported_configs(tmp_path, metadata, match):
    path = write_deepseek_gguf(tmp_path / "bad.gguf", hf_deepseek(3, n_layers=3),
                               metadata=metadata)
    with pytest.raises(UnsupportedModelError, match=match):
        loader.inspect(GGUFFile(path))

"""Placement rules (rules/*.yaml, ktjax.rules): profiles, first match wins, validation errors
that name the rule, `LLM(rules=...)` and `ktjax info --rules`."""
import re

import pytest

from ktjax import LLM, SamplingParams
from ktjax import rules as placement_rules
from ktjax.errors import KtjaxError, RulesError
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.models.info import describe
from ktjax.weights import DeviceExperts, HostExperts, HostWeight, LayerStack
from tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("r") / "m.gguf", "qwen2moe", n_experts=4,
                           shared_ffn=32)


def _place(path, rules, platform="cpu", tmp_path=None):
    if tmp_path is not None:
        (tmp_path / "r.yaml").write_text(rules)
        rules = str(tmp_path / "r.yaml")
    f = GGUFFile(path)
    spec = loader.inspect(f)
    return placement_rules.place(f, spec.table, spec.config.n_layers, rules, platform)


def test_cpu_profile_places_matrices_on_the_host(moe_path):
    p = _place(moe_path, "cpu")
    assert p["layers.ffn_gate_exps"].placement == "host"
    assert p["layers.attn_q"].placement == p["layers.ffn_up_shexp"].placement == "host"
    assert p["output"].placement == "host"                 # tied head packed from token_embd
    for path in ("token_embd", "layers.attn_norm", "layers.ffn_gate_inp", "layers.attn_q_bias",
                 "layers.ffn_gate_inp_shexp"):
        assert p[path].placement == "device", path
    f = GGUFFile(moe_path)
    spec = loader.inspect(f)
    host = loader.load_params(f, spec, p)
    device = loader.load_params(f, spec, _place(moe_path, "device"))
    assert isinstance(host["layers"]["ffn_exps"], HostExperts)
    assert isinstance(host["output"], HostWeight)
    assert isinstance(host["layers"]["attn_q+attn_k+attn_v"], HostWeight)   # fused, same type
    assert isinstance(device["layers"]["ffn_exps"], DeviceExperts)
    assert isinstance(device["layers"]["attn_q"], LayerStack) and "output" not in device
    loader.release_host_weights(host)


def test_host_linears_is_shorthand_for_a_profile():
    """host_linears resolves to a profile in one place, rules.rules_for, and excludes rules."""
    rules_for, path = placement_rules.rules_for, placement_rules.rules_path
    assert rules_for("qwen2moe", "gpu", host_linears=True) == path("cpu")
    assert rules_for("qwen2moe", "cpu", host_linears=False) == path("device")
    assert rules_for("qwen2moe", "cpu") == path("cpu")
    assert rules_for("qwen2moe", "gpu") == path("qwen2moe")
    assert rules_for("qwen2", "gpu") == path("device")       # no family profile
    assert rules_for("qwen2", "cpu", rules="device") == path("device")
    with pytest.raises(RulesError, match="either rules or host_linears"):
        rules_for("qwen2", "cpu", rules="cpu", host_linears=True)


def test_family_default_and_first_match(moe_path):
    p = _place(moe_path, "qwen2moe")
    assert p["layers.ffn_down_exps"].placement == "host"
    assert p["layers.ffn_down_shexp"].placement == "device"   # shared expert on the device
    assert p["layers.ffn_down_exps"].rule.name == "routed experts"


@pytest.mark.parametrize("rules,match", [
    ("rules:\n- {match: '.*', placement: device, format: keep, colour: red}\n",
     r"rule 0 \('.\*'\): unknown key\(s\) colour"),
    ("rules:\n- {name: ghost, match: 'nothing\\.here', placement: host, format: keep}\n"
     "- {match: '.*', placement: device, format: keep}\n",
     r"rule 0 \('ghost'\) matches no tensor"),
    ("rules:\n- {name: norms, match: '.*norm\\.weight', placement: host, format: keep}\n"
     "- {match: '.*', placement: device, format: keep}\n",
     r"rule 0 \('norms'\) places 'output_norm\.weight' \(vector\) on the host"),
    ("rules:\n- {name: attn, match: 'blk\\..*attn.*', placement: device, format: keep}\n",
     r"tensor 'token_embd\.weight' is placed nowhere"),
    ("rules:\n- {name: first, match: 'blk\\.0\\..*', placement: host, format: keep}\n"
     "- {name: rest, match: '.*', placement: device, format: keep}\n",
     r"placed by .*rule 0 \('first'\) but .* by .*rule 1 \('rest'\)"),
    ("rules:\n- {name: packed, match: '.*', placement: device, format: int8_row}\n",
     r"rule 0 \('packed'\): format int8_row needs the host kernels"),
    ("rules:\n- {name: packed, match: '.*', placement: device, format: int4}\n",
     r"rule 0 \('packed'\) places 'token_embd\.weight' \(embedding\) on the device in int4"),
    ("rules:\n- {name: ex, match: '.*_exps.*', placement: host, format: keep, kernel: moe}\n"
     "- {match: '.*', placement: device, format: keep}\n",
     r"rule 0 \('ex'\): unknown key\(s\) kernel"),
    ("rules:\n- {name: up, match: '.*ffn_up_exps.*', placement: device, format: keep}\n"
     "- {name: ex, match: '.*_exps.*', placement: host, format: keep}\n"
     "- {match: '.*', placement: device, format: keep}\n",
     "gate, up and down matrices must share one placement and format"),
    ("rules:\n- {name: up, match: '.*ffn_up_exps.*', placement: host, format: int8}\n"
     "- {name: ex, match: '.*_exps.*', placement: host, format: keep}\n"
     "- {match: '.*', placement: device, format: keep}\n",
     r"share one placement and format: .*ffn_up_exps by .*rule 0 \('up'\)"),
    ("rules: {match: x}\n", "expected a mapping with a `rules:` list"),
])
def test_invalid_rules_name_the_rule(tmp_path, moe_path, rules, match):
    with pytest.raises(RulesError, match=match):
        _place(moe_path, rules, tmp_path=tmp_path)


def test_host_placement_needs_a_cpu_or_cuda_program(moe_path):
    assert _place(moe_path, "qwen2moe", platform="gpu")["layers.ffn_up_exps"].placement == "host"
    with pytest.raises(RulesError,
                       match=r"rule 0 \('routed experts'\) places .* only from CPU and CUDA"):
        _place(moe_path, "qwen2moe", platform="tpu")


def test_unknown_profile(moe_path):
    with pytest.raises(RulesError, match="no rules profile 'fast'; profiles: cpu, deepseek2, device"):
        _place(moe_path, "fast")


def test_llm_rules_and_info(tmp_path, moe_path):
    llm = LLM(str(moe_path), rules="qwen2moe", max_model_len=64)
    assert llm.placement["layers.ffn_up_exps"].placement == "host"
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    with pytest.raises(KtjaxError, match="either rules or host_linears"):
        LLM(str(moe_path), rules="cpu", host_linears=True)
    text = describe(str(moe_path), "qwen2moe")
    assert "experts       4 routed (2 per token)" in text
    assert ["routed", "experts", "host", "keep", "6", "tensors"] in \
        [ln.split()[:6] for ln in text.splitlines()]
    assert re.fullmatch(r"  memory: device [\d.]+ MiB, host [\d.]+ MiB", text.splitlines()[-1])


@pytest.mark.parametrize("fmt", ["int8", "int8_row", "int4", "bf16"])
def test_host_formats_by_rule(tmp_path, moe_path, fmt):
    """Every host format a rule can name packs the matrices and the experts, and scores the
    prompt like the dense float32 program (within that format's quantization error)."""
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "rules:\n"
        "- {match: 'blk\\.\\d+\\.ffn_(gate|up|down)_exps\\.weight', placement: host, "
        f"format: {fmt}}}\n"
        "- {match: '.*norm\\.weight|.*\\.bias|blk\\.\\d+\\.ffn_gate_inp(_shexp)?\\.weight|"
        "token_embd\\.weight', placement: device, format: keep}\n"
        f"- {{match: '.*', placement: host, format: {fmt}}}\n")
    packed = LLM(str(moe_path), rules=str(rules), max_model_len=64)
    assert packed.placement["layers.attn_q"].format == fmt
    dense = LLM(str(moe_path), rules="device", max_model_len=64)
    prompt = list(range(5, 40))
    a, b = packed.score(prompt), dense.score(prompt)
    # measured: int8 / int8_row / bf16 differ by 1-2% of the scores' spread, int4 by 13%
    tolerance = 0.2 if fmt == "int4" else 0.04
    assert abs(a - b).max() < tolerance * (b.max() - b.min()), (fmt, abs(a - b).max())

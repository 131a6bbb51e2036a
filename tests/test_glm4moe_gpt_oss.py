"""GLM-4.5 (`glm4moe`), gpt-oss and YaRN-scaled Qwen3 against transformers on tiny random
models written to GGUF: logits, greedy decoding over the paged cache (gpt-oss: sliding
window and sinks), host placement (gpt-oss: host experts with biases and clamped SwiGLU, the
CPU attention kernel with sinks, hybrid expert placement), MXFP4 experts, the
multi-token-prediction layer skipped."""
import gguf
import numpy as np
import pytest

from hf_gguf_models import (hf_glm4moe, hf_gpt_oss, hf_qwen3_yarn, write_glm4moe_gguf,
                            write_gpt_oss_gguf, write_qwen3_gguf)
from ktjax import LLM, SamplingParams
from ktjax.errors import TensorError, UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.hybrid_experts import HybridExperts
from ktjax.weights import HostExperts
from ktjax.kernels.backends import CPU, PALLAS
from reference import hf_run, ktjax_logits
from test_models import IDS

LONG_IDS = np.random.default_rng(3).integers(3, 259, 40)  # past YaRN's 16 original positions


def _assert_close(ours, ref, tol=1e-4):
    assert np.abs(ours - ref).max() < tol * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _greedy(path, model, prompt, n=24):
    import torch
    llm = LLM(str(path), host_linears=False, dtype="float32", max_model_len=64)
    ours = llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0,
                                               ignore_eos=True))[0].token_ids
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)[0, len(prompt):].tolist()
    assert list(ours) == ref


def test_glm4moe_logits(tmp_path):
    model = hf_glm4moe(qk_norm=True, yarn=True)
    path = write_glm4moe_gguf(tmp_path / "glm.gguf", model, mtp_layer=True)
    _assert_close(ktjax_logits(path, LONG_IDS), hf_run(model, LONG_IDS))


def test_glm4moe_skips_the_mtp_layer_and_hosts_experts(tmp_path):
    model = hf_glm4moe()
    path = write_glm4moe_gguf(tmp_path / "glm.gguf", model, mtp_layer=True)
    f = GGUFFile(path)
    spec = loader.inspect(f)
    assert spec.config.n_layers == 3 and "blk.3.nextn.eh_proj.weight" in f.tensors
    assert not any("blk.3." in n for t in spec.table.values() for n in t.names(3))
    # The family's GPU profile: routed experts in the host MoE kernel (GGUF blocks kept).
    device, host = ktjax_logits(path, IDS), ktjax_logits(path, IDS, "glm4moe")
    assert np.abs(device - host).max() < 0.05 * np.abs(device).max()
    assert (device.argmax(-1) == host.argmax(-1)).mean() > 0.9


def test_mtp_layer_count_checked(tmp_path):
    path = write_glm4moe_gguf(tmp_path / "glm.gguf", hf_glm4moe(n_layers=2))
    f = GGUFFile(path)
    f.metadata["glm4moe.nextn_predict_layers"] = 2
    with pytest.raises(UnsupportedModelError, match="nextn_predict_layers = 2 with 2 blocks"):
        loader.inspect(f)


def test_gpt_oss_logits(tmp_path):
    model = hf_gpt_oss()
    path = write_gpt_oss_gguf(tmp_path / "oss.gguf", model)
    _assert_close(ktjax_logits(path, LONG_IDS), hf_run(model, LONG_IDS))


def test_gpt_oss_greedy_sliding_window_and_sinks_over_the_cache(tmp_path):
    """24 decode steps: the window (5) slides over the paged cache; sinks in every step."""
    model = hf_gpt_oss()
    _greedy(write_gpt_oss_gguf(tmp_path / "oss.gguf", model), model, [int(t) for t in IDS[:8]])


def test_gpt_oss_on_the_pallas_backend(tmp_path):
    """The engine's backend is used whatever it is: the Pallas kernel (interpreted on CPU)
    with the sinks and the alternating windows, against transformers."""
    model = hf_gpt_oss(n_layers=2)
    path = write_gpt_oss_gguf(tmp_path / "oss.gguf", model)
    _assert_close(ktjax_logits(path, IDS, backend=PALLAS), hf_run(model, IDS))


def _mxfp4_gpt_oss(tmp_path, **kw):
    """A tiny gpt-oss whose experts are stored as MXFP4 (as the released files), and
    transformers' model running the same (dequantized) expert weights."""
    import torch
    model = hf_gpt_oss(**kw)
    t = gguf.GGMLQuantizationType.MXFP4
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                w = p.detach().numpy().transpose(0, 2, 1)        # GGUF's [E, out, in]
                deq = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
                p.copy_(torch.from_numpy(deq.reshape(w.shape).transpose(0, 2, 1).copy()))
    path = write_gpt_oss_gguf(tmp_path / "oss.gguf", model, expert_qtype=t)
    assert GGUFFile(path).tensors["blk.0.ffn_up_exps.weight"].qtype == t
    return model, path


def test_gpt_oss_mxfp4_experts(tmp_path):
    """MXFP4 experts dequantized for the device match transformers."""
    model, path = _mxfp4_gpt_oss(tmp_path)
    _assert_close(ktjax_logits(path, IDS), hf_run(model, IDS))


HOST_EXPERTS = ("rules:\n- {match: '.*_exps\\.weight', placement: host, format: keep}\n"
                "- {match: '.*', placement: device, format: keep}\n")


def _mostly_close(ours, ref, tol=0.03):
    """Within tol of the largest logit at >= 85% of positions: the host kernels' int8
    activations (~1% here) may flip a near tie in a router's top-k at a position, which
    moves that position's logits far; a wrong bias or activation moves every position."""
    err = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert np.mean(err < tol) >= 0.85, np.round(err, 3)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def _greedy_near_reference(llm, model, prompt, n=16):
    """n greedy tokens from the engine, each transformers' best next token given the same
    prefix, or within 3% of the largest logit of it (a near tie), at >= 85% of steps."""
    ours = list(llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0,
                                                    ignore_eos=True))[0].token_ids)
    ref = hf_run(model, np.asarray(prompt + ours))[len(prompt) - 1:-1]
    gap = (ref.max(-1) - ref[np.arange(n), ours]) / np.abs(ref).max()
    assert np.mean(gap < 0.03) >= 0.85, np.round(gap, 3)


def test_gpt_oss_cpu_path(tmp_path):
    """The CPU path against transformers, 40 positions (the window of 5 slides; layer 0 slides,
    layer 1 is full): the host attention kernel with sinks exactly; the MXFP4 experts in the
    host MoE kernel (kept lossless, with their biases and clamped SwiGLU; int8 activations);
    the CPU profile (every matrix in the host kernels); the engine's default on CPU (that
    profile, the host attention kernel) decoding greedily."""
    model, path = _mxfp4_gpt_oss(tmp_path, n_layers=2)
    ref = hf_run(model, LONG_IDS)
    _assert_close(ktjax_logits(path, LONG_IDS, backend=CPU), ref)
    rules = tmp_path / "experts.yaml"
    rules.write_text(HOST_EXPERTS)
    _mostly_close(ktjax_logits(path, LONG_IDS, str(rules), backend=CPU), ref)
    # this random model's query logits amplify the int8 rounding of the attention matrices
    _mostly_close(ktjax_logits(path, LONG_IDS, "cpu", backend=CPU), ref, tol=0.1)
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    assert isinstance(llm.engine.params["layers"]["ffn_exps"], HostExperts)
    _greedy_near_reference(llm, model, [int(t) for t in IDS[:8]])


def test_gpt_oss_hybrid_experts(tmp_path):
    """Host experts split by an `experts:` section (n_cpu_moe: block 0's on the host, block
    1's in the device pool; `hot` moves two of block 0's too): the prefill's grouped pool path
    (40 tokens), the gathered one (8 tokens, and the engine's decode steps), and a prefill
    streaming every expert to the device, against transformers."""
    model, path = _mxfp4_gpt_oss(tmp_path, n_layers=2)
    rules = tmp_path / "hybrid.yaml"
    rules.write_text(HOST_EXPERTS + "experts: {n_cpu_moe: 1, hot: {0: [1, 6]}}\n")
    _mostly_close(ktjax_logits(path, LONG_IDS, str(rules), backend=CPU), hf_run(model, LONG_IDS))
    _mostly_close(ktjax_logits(path, IDS[:8], str(rules), backend=CPU), hf_run(model, IDS[:8]))
    llm = LLM(str(path), rules=str(rules), attention="cpu", dtype="float32", max_model_len=64)
    assert isinstance(llm.engine.params["layers"]["ffn_exps"], HybridExperts)
    _greedy_near_reference(llm, model, [int(t) for t in IDS[:8]])
    # a prefill of >= 32 tokens runs every expert on the device from the streamed copy, with
    # its biases and clamped SwiGLU: as exact as the all-device program
    rules.write_text(HOST_EXPERTS + "experts: {device_prefill_min_tokens: 32}\n")
    _assert_close(ktjax_logits(path, LONG_IDS, str(rules), backend=CPU), hf_run(model, LONG_IDS))


@pytest.mark.parametrize("mscale_all_dim", [None, 0.707])
def test_qwen3_yarn_logits(tmp_path, mscale_all_dim):
    model = hf_qwen3_yarn(mscale_all_dim=mscale_all_dim)
    path = write_qwen3_gguf(tmp_path / "q3.gguf", model)
    _assert_close(ktjax_logits(path, LONG_IDS), hf_run(model, LONG_IDS))


def test_bad_configs_name_the_key_or_tensor(tmp_path):
    qwen = GGUFFile(write_qwen3_gguf(tmp_path / "q3.gguf", hf_qwen3_yarn()))
    qwen.metadata["qwen3.rope.scaling.type"] = "longrope"
    with pytest.raises(UnsupportedModelError, match="qwen3.rope.scaling.type = 'longrope'"):
        loader.inspect(qwen)
    path = write_gpt_oss_gguf(tmp_path / "oss.gguf", hf_gpt_oss(n_layers=2))
    oss = GGUFFile(path)
    oss.metadata["gpt-oss.expert_used_count"] = 0
    with pytest.raises(UnsupportedModelError, match="expert_used_count = 0"):
        loader.inspect(oss)
    oss = GGUFFile(path)
    del oss.tensors["blk.1.attn_sinks.weight"]
    with pytest.raises(TensorError, match="'blk.1.attn_sinks.weight' is missing"):
        loader.inspect(oss)

"""Routed experts split between the device and the host (ktjax.hybrid_experts) and the
stream-ordered host MoE calls (ktjax.host.moe_async): the submit/wait pair against the fused
kernel, the skip id, failures surfacing as KernelError after the step, bad input, the
`experts:` rules section, and the combined output against the all-host and all-device
programs. The gpu tests run the CUDA handlers, inside the captured step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax import hybrid_experts as hx
from ktjax import device_quant
from ktjax.device_quant import QuantMatrix
from ktjax.gguf.ggml_types import GGMLQuantizationType as T
from ktjax.errors import KernelError, RulesError
from ktjax.gguf.reader import GGUFFile
from ktjax.host import moe as hm
from ktjax.host.linear import release
from ktjax.host import moe_async as ma
from ktjax.weights import Route
from tiny_models import write_tiny_gguf

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
E, H, I, K = 8, 64, 32, 2


@pytest.fixture(scope="module")
def expert_sets():
    rng = np.random.default_rng(0)
    sets = [hm.pack_experts_float(*(rng.standard_normal(s, np.float32) * 0.1 for s in
                                    ((E, I, H), (E, I, H), (E, H, I)))) for _ in range(2)]
    yield tuple(sets)
    for h in sets:
        release(h)


def _routing(rng, t):
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(t)]).astype(np.int32)
    return rng.standard_normal((t, H), np.float32), ids, rng.random((t, K), np.float32)


def _submit_wait(handles, t):
    def f(x, ids, w, layer):
        token, site = ma.moe_submit(x, ids, w, layer, handles)
        return ma.moe_wait(token, site, x, t, H)
    return jax.jit(f)


def test_submit_wait_is_the_fused_kernel_and_skips_minus_one(expert_sets):
    rng = np.random.default_rng(1)
    x, ids, w = _routing(rng, 5)
    f = _submit_wait(expert_sets, 5)
    got = np.asarray(f(x, ids, w, jnp.int32(1)))
    np.testing.assert_array_equal(got, hm.moe_forward(x, ids, w, expert_sets[1]))
    skipped = ids.copy()
    skipped[:, 1] = ma.SKIP
    skipped[0, :] = ma.SKIP               # a token with every slot on the device: zeros
    got = np.asarray(f(x, skipped, w, jnp.int32(0)))
    want = hm.moe_forward(x, ids[:, :1], w[:, :1], expert_sets[0])
    want[0] = 0
    np.testing.assert_array_equal(got, want)
    ma.raise_host_errors()  # nothing recorded


def test_device_part_is_ordered_after_the_submit_as_data(expert_sets):
    """The shared experts (the device's part) read x through ktjax_moe_after, which takes the
    submit's token, so the dependence survives XLA's optimizations (it removes optimization
    barriers before scheduling) and the host job starts first; the sum is still right."""
    import re
    rng = np.random.default_rng(7)
    x, ids, w = _routing(rng, 5)
    shared = rng.standard_normal((H, H), np.float32)
    hybrid = hx.HybridExperts(handles=expert_sets[:1], window=0)
    f = jax.jit(lambda x, ids, w: hybrid.with_extra(x, Route(ids, w), lambda v: v @ shared))
    np.testing.assert_allclose(np.asarray(f(x, ids, w)),
                               hm.moe_forward(x, ids, w, expert_sets[0]) + x @ shared,
                               rtol=1e-5, atol=1e-5)
    hlo = f.lower(x, ids, w).compile().as_text()
    name = {t: re.search(rf"%(\S+) = \S+ custom-call\([^)]*\), custom_call_target=\"{t}\"",
                         hlo).group(1) for t in ("ktjax_moe_submit", "ktjax_moe_after")}
    after_line = next(ln for ln in hlo.splitlines() if f"%{name['ktjax_moe_after']} =" in ln)
    assert f"%{name['ktjax_moe_submit']}" in after_line.split("custom_call_target")[0]
    readers = [ln for ln in hlo.splitlines() if f"%{name['ktjax_moe_after']})" in ln or
               f"%{name['ktjax_moe_after']}," in ln]
    assert any("ktjax_moe_wait" not in ln for ln in readers)      # the shared experts' dot


def test_skip_id_at_every_isa_level(expert_sets, isa):
    """Expert id -1 drops its slot in the fused kernel (its weight ignored, even NaN): the
    same as a zero weight, at each ISA level this machine has and in the scalar reference
    (AMX: within the tiles' bf16 rounding)."""
    rng = np.random.default_rng(6)
    x, ids, w = _routing(rng, 24)
    skipped, w_nan = ids.copy(), w.copy()
    skipped[::2, 0] = ma.SKIP
    w_nan[::2, 0] = np.nan
    for reference in (False, True):
        got = hm.moe_forward(x, skipped, w_nan, expert_sets[0], isa=isa, reference=reference)
        want = hm.moe_forward(x, ids, np.where(skipped == ma.SKIP, 0, w), expert_sets[0],
                              isa=isa, reference=reference)
        if isa == "amx":  # tiles take experts by token count, which the skip changes
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)


def test_a_failing_host_job_is_a_kernel_error_after_the_step(expert_sets):
    rng = np.random.default_rng(2)
    x, ids, w = _routing(rng, 3)
    f = _submit_wait(expert_sets, 3)
    out = np.asarray(f(x, ids, w, jnp.int32(7)))       # no expert set 7: zeros, error recorded
    assert not out.any()
    with pytest.raises(KernelError, match=r"layer 7\): layer index 7 outside the 2 expert sets"):
        ma.raise_host_errors()
    ma.raise_host_errors()                              # taken once; the next step is clean
    np.testing.assert_array_equal(np.asarray(f(x, ids, w, jnp.int32(0))),
                                  hm.moe_forward(x, ids, w, expert_sets[0]))


def test_worker_path_of_the_cuda_handlers(expert_sets):
    """The host side of the CUDA handlers without CUDA: the job handed to the worker thread
    and waited for, many times (the counters pair each wait with its submit), and a failure
    (zeros, an error, the next job fine)."""
    from ktjax import _native
    rng = np.random.default_rng(5)
    site = ma.reserve_site(3, H, K, expert_sets)
    for i in range(50):
        x, ids, w = _routing(rng, 3)
        got = _native.moe_site_run_async(site, x, ids, w, i % 2)
        np.testing.assert_array_equal(got, hm.moe_forward(x, ids, w, expert_sets[i % 2]))
    assert not _native.moe_site_run_async(site, x, ids, w, 2).any()
    with pytest.raises(KernelError, match="layer index 2 outside the 2 expert sets"):
        ma.raise_host_errors()
    np.testing.assert_array_equal(_native.moe_site_run_async(site, x, ids, w, 1),  # recovers
                                  hm.moe_forward(x, ids, w, expert_sets[1]))


def test_bad_input_names_the_problem(expert_sets):
    with pytest.raises(KernelError, match="no expert sets"):
        ma.reserve_site(4, H, K, ())
    with pytest.raises(KernelError, match="must be positive"):
        ma.reserve_site(0, H, K, expert_sets)
    taken = ma.reserve_site(3, H, K, expert_sets)     # an exported program's recorded id
    with pytest.raises(KernelError, match=f"moe site {taken} is taken"):
        ma.reserve_site(3, H, K, expert_sets, at=taken)
    assert ma.reserve_site(3, H, K, expert_sets, at=taken + 1000) == taken + 1000
    assert ma.reserve_site(3, H, K, expert_sets) == taken + 1001    # ids go on past it
    x = jnp.zeros((3, H), jnp.float32)
    with pytest.raises(KernelError, match=r"must both be \[3, k\]"):
        ma.moe_submit(x, jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 3), jnp.float32),
                      jnp.int32(0), expert_sets)
    call = jax.ffi.ffi_call("ktjax_moe_wait", jax.ShapeDtypeStruct((3, H), np.float32))
    with pytest.raises(Exception, match="no host MoE site 999999 was reserved"):
        jax.jit(lambda t: call(t, t, site=np.int64(999999)))(jnp.zeros((1,), jnp.uint8))
    site = ma.reserve_site(3, H, K, expert_sets)
    submit = jax.ffi.ffi_call("ktjax_moe_submit", jax.ShapeDtypeStruct((1,), np.uint8))
    bad = {  # operand -> (value, the error naming it)
        "x": (jnp.zeros((3, 32), jnp.float32), r"x: expected dimension 1 = 64 \(hidden size of site"),
        "ids": (jnp.zeros((3, 3), jnp.int32), r"expert_weights: expected the shape of expert_ids"),
        "ids_dtype": (jnp.zeros((3, K), jnp.float32), r"expert_ids: expected dtype int32, got float32"),
        "layer": (jnp.zeros((2,), jnp.int32), r"layer: expected a scalar, got shape \[2\]"),
    }
    for name, (value, match) in bad.items():
        ops = [jnp.zeros((3, H), jnp.float32), jnp.zeros((3, K), jnp.int32),
               jnp.zeros((3, K), jnp.float32), jnp.int32(0), jnp.int32(0)]
        ops[{"x": 0, "ids": 1, "ids_dtype": 1, "layer": 3}[name]] = value
        with pytest.raises(Exception, match=match):
            jax.jit(lambda *a: submit(*a, site=np.int64(site)))(*ops)
    wait = jax.ffi.ffi_call("ktjax_moe_wait", jax.ShapeDtypeStruct((4, H), np.float32))
    with pytest.raises(Exception, match=r"out: expected dimension 0 = 3 \(tokens of site"):
        jax.jit(lambda t: wait(t, t, site=np.int64(site)))(jnp.zeros((1,), jnp.uint8))


# ---- placement ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("h") / "m.gguf", "qwen2moe", n_experts=E,
                           n_used=K, shared_ffn=32, n_layers=3, hidden=H, expert_ffn=I)


def _names(moe_path):
    return [tuple(f"blk.{b}.ffn_{m}_exps.weight" for m in ("gate", "up", "down"))
            for b in range(3)]


def _rules(tmp_path, section: str) -> str:
    from ktjax.rules import rules_path
    p = tmp_path / "r.yaml"
    p.write_text(rules_path("qwen2moe").read_text() + section)
    return str(p)


@pytest.mark.parametrize("section, match", [
    ("experts: {gpu: 1}", "unknown key.*gpu"),
    ("experts: {n_cpu_moe: 4}", r"n_cpu_moe: expected 0..3 blocks, got 4"),
    ("experts: {n_cpu_moe: 1, device_blocks: [2]}", "not both"),
    ("experts: {device_blocks: [3]}", r"device_blocks: block 3 is not one of the 3 blocks"),
    ("experts: {hot: {1: [8]}}", r"hot\[1\]: expected a list of expert ids in \[0, 8\)"),
    ("experts: [1]", "expected a mapping"),
])
def test_rules_errors_name_the_section(tmp_path, moe_path, section, match):
    with pytest.raises(RulesError, match=match):
        hx.read_placement(_rules(tmp_path, section + "\n"), 3, E, [0, 1, 2])


def _reference(f, names, hybrid, layer, x, ids, w):
    """Device pairs in float64 from the GGUF weights, host pairs through the fused kernel."""
    from ktjax.gguf import quants
    g, u, d = (quants.dequantize(f.tensors[n].data, f.tensors[n].qtype, f.tensors[n].shape)
               .astype(np.float64) for n in names[layer])
    slots = np.asarray(hybrid.slots)[layer]
    on_dev = slots[ids] >= 0
    host = hm.moe_forward(x, np.where(on_dev, ma.SKIP, ids), w, hybrid.handles[layer])
    out = host.astype(np.float64)
    for t in range(x.shape[0]):
        for j in range(K):
            if on_dev[t, j]:
                e = ids[t, j]
                a = g[e] @ x[t]
                out[t] += w[t, j] * (d[e] @ (a / (1 + np.exp(-a)) * (u[e] @ x[t])))
    return out


@pytest.mark.parametrize("tokens", [4, 40])   # the gathered (decode) and grouped paths
@pytest.mark.parametrize("qtype,kernel", [("F32", "auto"), ("Q8_0", "auto"), ("Q4_0", "auto"),
                                          ("Q8_0", "pallas"), ("Q4_0", "pallas")])
def test_split_layer_is_device_pairs_plus_host_pairs(tmp_path, moe_path, tokens, qtype, kernel,
                                                     monkeypatch):
    """Quantized experts stay in their blocks in the pool (QuantMatrix, bytes as `ktjax info`
    counts them; decode pairs through XLA's reduction or the Pallas gathered GEMV); F32 ones
    are an array."""
    monkeypatch.setenv("KTJAX_QUANT_KERNEL", kernel)
    from ktjax.kernels import quant_matmul
    gathered = []
    real = quant_matmul.gathered_gemv
    monkeypatch.setattr(quant_matmul, "gathered_gemv",
                        lambda *a, **k: gathered.append(1) or real(*a, **k))
    if qtype != "F32":
        moe_path = write_tiny_gguf(tmp_path / "q.gguf", "qwen2moe", n_experts=E, n_used=K,
                                   shared_ffn=32, n_layers=3, hidden=H, expert_ffn=I,
                                   expert_qtype=T[qtype])
    f = GGUFFile(moe_path)
    names = _names(moe_path)
    rules = _rules(tmp_path, "experts: {device_blocks: [2], hot: {0: [1, 3], 1: [5]}}\n")
    handles = tuple(hm.pack_experts_gguf(*((f.tensors[n].data, int(f.tensors[n].qtype))
                                           for n in ns), E, H, I) for ns in names)
    hybrid = hx.build(handles, f, names, rules, 3, np.float32, None, force=False)
    assert hybrid.window == E and hybrid.gate.shape == (2 + 1 + E, I, H)
    assert isinstance(hybrid.gate, QuantMatrix) == (qtype != "F32")
    pool = sum(sum(int(a.nbytes) for a in jax.tree.leaves(m))
               for m in (hybrid.gate, hybrid.up, hybrid.down))
    assert pool == hx.device_expert_bytes(f, names, rules, 3, 4)
    rng = np.random.default_rng(3)
    x, ids, w = _routing(rng, tokens)
    run = jax.jit(lambda hy, x, ids, w: hy.with_extra(x, Route(ids, w), None))
    for layer in range(3):
        got = np.asarray(run(hybrid.at_layer(jnp.int32(layer)), x, ids, w))
        np.testing.assert_allclose(got, _reference(f, names, hybrid, layer, x, ids, w),
                                   rtol=1e-4, atol=1e-5)
    # gate, up and down of the decode pairs (traced once) through the Pallas kernel
    assert len(gathered) == (3 if kernel == "pallas" and qtype != "F32" and tokens == 4 else 0)
    for h in handles:
        release(h)


def test_pool_of_mixed_k_quants_widens_to_one_layout():
    """Layers whose experts mix K-quants (Q4_K_M files: some layers' down Q6_K) share one
    widened pool layout; each slot dequantizes to gguf's values of its expert."""
    from types import SimpleNamespace
    import gguf
    from ktjax.gguf import quants
    rng = np.random.default_rng(8)
    experts, rows, cols = 3, 4, 256

    def tensor(qtype, f16_offsets):     # random blocks with finite float16 scales
        elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (experts * rows, cols // elems, nbytes), dtype=np.uint8)
        for off in f16_offsets:
            d = (rng.standard_normal(raw.shape[:2]) * 1e-2).astype(np.float16)
            raw[..., off:off + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
        return SimpleNamespace(data=raw.reshape(experts, rows, -1), qtype=qtype,
                               shape=(experts, rows, cols))

    layers = [(tensor(T.Q4_K, (0, 2)), [0, 2]), (tensor(T.Q6_K, (208,)), [1])]
    form = hx._stream_form([t for t, _ in layers])
    assert form == "k_mixed"
    pool = hx._stack_pool([hx._pool_part(t, sel, form, np.float32) for t, sel in layers], None)
    want = np.concatenate([quants.dequantize(t.data, t.qtype, t.shape)[sel]
                           for t, sel in layers])
    np.testing.assert_array_equal(np.asarray(device_quant.dequantize(pool)), want)


def _scores(path, rules, ids, **kw):
    llm = LLM(str(path), rules=rules, max_model_len=128, **kw)
    out = llm.generate([ids[:6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    return llm.score(ids), out[0].token_ids, llm


def test_combined_output_spans_the_all_host_and_all_device_programs(tmp_path, moe_path):
    ids = list(range(5, 40))
    host, host_tok, _ = _scores(moe_path, "qwen2moe", ids)
    dev, dev_tok, _ = _scores(moe_path, "device", ids)
    all_dev, all_dev_tok, llm = _scores(moe_path, _rules(tmp_path, "experts: {n_cpu_moe: 0}\n"), ids)
    assert isinstance(llm.engine.params["layers"]["ffn_exps"], hx.HybridExperts)
    np.testing.assert_allclose(all_dev, dev, atol=1e-5)
    assert all_dev_tok == dev_tok
    all_host, all_host_tok, _ = _scores(moe_path, _rules(tmp_path, "experts: {n_cpu_moe: 3}\n"), ids)
    np.testing.assert_allclose(all_host, host, atol=1e-5)
    assert all_host_tok == host_tok
    mixed, _, _ = _scores(moe_path, _rules(
        tmp_path, "experts: {n_cpu_moe: 2, hot: {0: [1, 3], 1: [0, 2, 4, 6]}}\n"), ids)
    # between the two: host pairs carry the host kernels' int8 activation error, device pairs not
    assert 0 < np.abs(mixed - host).max() and 0 < np.abs(mixed - dev).max()
    assert np.abs(mixed - dev).max() < np.abs(host - dev).max()


def test_expert_placement_writes_the_hot_experts_within_the_budget(tmp_path, moe_path):
    """scripts/expert_placement.py: routing counts on a text -> the most chosen experts on
    the device within the byte budget; the rules file it writes loads as a split."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "expert_placement.py"
    spec = importlib.util.spec_from_file_location("expert_placement", path)
    ep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ep)
    counts = {(0, 1): 9, (0, 2): 1, (1, 5): 7, (2, 0): 3}
    assert ep.hot_section(counts, 100, 250) == {0: [1], 1: [5]}
    out = tmp_path / "hot.yaml"
    budget = 4 * 3 * H * I * 2 / 2 ** 30          # four experts in bfloat16
    assert ep.main(["--model", str(moe_path), "--tokens", "64", "--budget-gib", str(budget),
                    "--out", str(out)]) == 0
    placement = hx.read_placement(out, 3, E, [0, 1, 2])
    assert sum(len(v) for v in placement.device.values()) == 4
    llm = LLM(str(moe_path), rules=str(out), max_model_len=64)
    assert isinstance(llm.engine.params["layers"]["ffn_exps"], hx.HybridExperts)


def test_info_shows_device_expert_memory(tmp_path, moe_path):
    from ktjax.models.info import describe
    rules = _rules(tmp_path, "experts: {device_blocks: [2]}\n")
    lines = describe(str(moe_path), rules).splitlines()
    moved = [ln for ln in lines if "experts on the device" in ln]
    assert len(moved) == 1
    per_expert = 3 * H * I * 4   # float32 on CPU programs
    assert f"{E * per_expert / 2 ** 20:.2f} MiB" in moved[0]
    # streamed prefill: a second host copy of every layer's experts (float32 files: dequantized)
    rules = _rules(tmp_path, "experts: {device_prefill_min_tokens: 64}\n")
    lines = describe(str(moe_path), rules).splitlines()
    streamed = [ln for ln in lines if "experts streamed" in ln]
    assert len(streamed) == 1 and f"{3 * E * per_expert / 2 ** 20:.2f} MiB" in streamed[0]


def test_a_failing_host_job_fails_the_request_not_the_engine(tmp_path, moe_path):
    """A layer's host expert set gone from the store: generate raises KernelError after the
    step (no crash, no hang), the step's request is aborted and its pages freed, and the
    engine takes the next request (which fails the same way, cleanly)."""
    import weakref
    from ktjax.weights import host_handles
    llm = LLM(str(moe_path), rules=_rules(tmp_path, "experts: {hot: {0: [1]}}\n"),
              max_model_len=64)
    handles = list(host_handles(llm.engine.params))
    gone = llm.engine.params["layers"]["ffn_exps"].handles[2]
    release(gone)
    free = llm.engine.pool.free_pages
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for _ in range(2):
        with pytest.raises(KernelError, match=r"host MoE \(site \d+, layer 2\): .*handle"):
            llm.generate([[5, 6, 7]], greedy)
        assert not llm.engine.has_work() and llm.engine.pool.free_pages == free
    ma.raise_host_errors()  # nothing left over
    for fin in list(weakref.finalize._registry):  # release the rest here, not `gone` twice
        if fin.peek() is not None and fin.peek()[0] is llm:
            fin.detach()
    for h in handles:
        if h != gone:
            release(h)


# ---- CUDA --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 40])
def test_cuda_handlers_match_the_cpu_kernel(expert_sets, tokens):
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(4)
    x, ids, w = _routing(rng, tokens)
    gpu_dev = [d for d in jax.devices() if d.platform == "gpu"][0]
    args = [jax.device_put(a, gpu_dev) for a in (x, ids, w, np.int32(1))]
    got = np.asarray(_submit_wait(expert_sets, tokens)(*args))
    np.testing.assert_array_equal(got, hm.moe_forward(x, ids, w, expert_sets[1]))
    # failure inside the (captured) step: zeros and an error after it, never a hang
    args[3] = jax.device_put(np.int32(9), gpu_dev)
    f = _submit_wait(expert_sets, tokens)
    assert not np.asarray(f(*args)).any()
    with pytest.raises(KernelError, match="layer index 9"):
        ma.raise_host_errors()


@pytest.mark.gpu
def test_cuda_hybrid_step_matches_the_cpu_program(tmp_path, moe_path):
    """The GPU step with host experts (stream-ordered, captured) scores like the CPU program
    of the same rules (same host kernel; the rest float32 on either device), and a split
    placement like the all-device GPU program within the host kernels' int8 error."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    ids = list(range(5, 40))
    cpu = jax.devices("cpu")[0]
    host_cpu, _, _ = _scores(moe_path, "qwen2moe", ids, dtype="float32", device=cpu)
    host_gpu, _, llm = _scores(moe_path, "qwen2moe", ids, dtype="float32")
    assert isinstance(llm.engine.params["layers"]["ffn_exps"], hx.HybridExperts)
    np.testing.assert_allclose(host_gpu, host_cpu, atol=1e-2)   # int8 roundings may flip
    dev, _, _ = _scores(moe_path, "device", ids, dtype="float32")
    mixed, _, _ = _scores(moe_path, _rules(
        tmp_path, "experts: {n_cpu_moe: 2, hot: {0: [1, 3]}}\n"), ids, dtype="float32")
    assert np.abs(mixed - dev).max() < np.abs(host_gpu - dev).max() + 1e-3


# ---- GPU programs lowered on this machine ------------------------------------------------

# custom calls XLA itself implements on every platform (host <-> device copies)
XLA_TARGETS = {"annotate_device_placement"}

def _synthetic(tmp_path_factory, shape: str):
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_gguf.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_gguf", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_synthetic_gguf", mod)    # its dataclasses look it up
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("syn") / f"{shape}.gguf"
    mod.write(str(out), shape, 0, mod.T.Q4_K)
    return out


def _custom_calls(f, lowering: str, bucket, placed_for: str, rules: str | None = None):
    """The custom_call targets of a step program of `f` lowered for `lowering` ("cuda"
    without a GPU), its params placed by the loader for programs of `placed_for` (by
    `rules`, default the platform's)."""
    import re
    from ktjax import rules as placement_rules
    from ktjax.engine.kv_cache import make_kv_cache
    from ktjax.engine.programs import ProgramCache
    from ktjax.kernels.backends import get_backend
    from ktjax.models import loader
    spec = loader.inspect(f)
    rules = placement_rules.rules_for(f.architecture, placed_for, rules)
    placement = placement_rules.place(f, spec.table, spec.config.n_layers, rules, placed_for)
    params = loader.load_params(f, spec, placement, np.float32, platform=placed_for)
    kv = make_kv_cache(spec.config.cache_spec, 9, 16, "float32")
    programs = ProgramCache(spec.family.make_forward(spec.config, get_backend("reference")),
                            params, kv, spec.config.vocab_size)
    traced = programs._forward.trace(*programs.lower_args(("step", bucket, None)))
    text = traced.lower(lowering_platforms=(lowering,)).as_text()
    loader.release_host_weights(params)
    return set(re.findall(r"custom_call @([\w.$]+)", text))


@pytest.mark.parametrize("shape", ["qwen3moe-tiny", "deepseek2-tiny"])
def test_cuda_programs_call_only_targets_with_cuda_handlers(tmp_path_factory, shape):
    """The first GPU run failed because a GPU step called ktjax_stacked_matvec, a host target
    with no CUDA handler: the params of GPU programs (placed for platform "gpu") lowered for
    CUDA, decode and prefill, call only targets that have one, the routed experts through
    the stream-ordered submit/wait pair. The same program with CPU-placed params does call
    CPU-only targets (LayerStack's matvec), which this check catches."""
    from ktjax import _native
    from ktjax.engine.buckets import StepBucket
    cuda_targets = set(_native.cuda_ffi_targets())
    f = GGUFFile(_synthetic(tmp_path_factory, shape))
    for bucket in (StepBucket(1, 0, 0, 8), StepBucket(0, 1, 32, 8)):
        calls = _custom_calls(f, "cuda", bucket, placed_for="gpu")
        assert {"ktjax_moe_submit", "ktjax_moe_wait"} <= calls
        assert calls <= cuda_targets | XLA_TARGETS, calls - cuda_targets
    cpu_placed = _custom_calls(f, "cuda", StepBucket(1, 0, 0, 8), placed_for="cpu")
    assert "ktjax_stacked_matvec" in cpu_placed - cuda_targets


def test_cpu_only_attention_is_refused_for_gpu_programs():
    from ktjax.kernels import backends
    with pytest.raises(KernelError, match="no handler in gpu programs"):
        backends.get_backend("cpu", "gpu")
    assert backends.get_backend("cpu", "cpu") is backends.get_backend("auto", "cpu")


def test_step_programs_are_built_for_the_engines_device(moe_path):
    """Programs are lowered for the device holding the engine's params and KV cache, not
    JAX's default backend: on a GPU host an engine given the CPU compiled its steps (with
    their CPU-only host calls) for CUDA, the first GPU run's failure."""
    from ktjax.engine.buckets import StepBucket
    from ktjax.engine.programs import Greedy
    cpu = jax.devices("cpu")[0]
    llm = LLM(str(moe_path), rules="qwen2moe", max_model_len=64, device=cpu)
    args = llm.engine.programs.lower_args(("step", StepBucket(1, 0, 0, 8), Greedy(False)))
    leaves = jax.tree.leaves(args, is_leaf=lambda n: isinstance(n, jax.ShapeDtypeStruct))
    shapes = [s for s in leaves if isinstance(s, jax.ShapeDtypeStruct)]
    assert shapes and all(s.sharding is not None and s.sharding.device_set == {cpu}
                          for s in shapes)


# ---- expert deferral ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3moe_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3")
    kw = dict(n_experts=E, n_used=4, hidden=H, expert_ffn=I, seed=3)
    return (write_tiny_gguf(d / "one.gguf", "qwen3moe", n_layers=1, **kw),
            write_tiny_gguf(d / "four.gguf", "qwen3moe", n_layers=4, **kw))


def _rules_of(tmp_path, arch: str, section: str) -> str:
    from ktjax.rules import rules_path
    p = tmp_path / f"{arch}-{abs(hash(section))}.yaml"
    p.write_text(rules_path(arch).read_text() + section)
    return str(p)


def test_deferral_zero_is_unchanged_and_n_moves_experts_a_layer_on(tmp_path, qwen3moe_paths):
    """defer 0 scores exactly as the plain host experts. defer 2 of a one-layer model only
    moves the deferred sum after the layer (the same logits within float rounding); of a
    four-layer model it changes the logits (the next layers miss those experts) but not
    beyond a perturbation, and generates."""
    ids = list(range(5, 45))
    one, four = qwen3moe_paths
    for path, close in ((one, True), (four, False)):
        plain = LLM(str(path), rules="qwen3moe", max_model_len=64).score(ids)
        zero = LLM(str(path), rules=_rules_of(tmp_path, "qwen3moe", "experts: {defer: 0}\n"),
                   max_model_len=64)
        assert isinstance(zero.engine.params["layers"]["ffn_exps"], hx.HybridExperts)
        np.testing.assert_array_equal(zero.score(ids), plain)
        two = LLM(str(path), rules=_rules_of(tmp_path, "qwen3moe", "experts: {defer: 2}\n"),
                  max_model_len=64)
        deferred = two.score(ids)
        gap = np.abs(deferred - plain).max()
        if close:
            assert gap < 1e-4
        else:
            assert 1e-3 < gap < 2.0
        out = two.generate([ids[:5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].token_ids) == 4
        ma.raise_host_errors()
    # only host experts are deferred: with every expert on the device, defer changes nothing
    on_device = [LLM(str(four), rules=_rules_of(tmp_path, "qwen3moe", section),
                     max_model_len=64).score(ids)
                 for section in ("experts: {n_cpu_moe: 0}\n", "experts: {n_cpu_moe: 0, defer: 2}\n")]
    np.testing.assert_array_equal(*on_device)


def test_deferral_in_deepseek2_and_rules_errors(tmp_path_factory, tmp_path):
    """DeepSeek's leading dense layer, then routed layers with a shared expert, deferring:
    runs and differs from no deferral; its CUDA program still calls only CUDA targets. A
    defer of k or a negative one is refused naming the key."""
    from ktjax import _native
    from ktjax.engine.buckets import StepBucket
    path = _synthetic(tmp_path_factory, "deepseek2-tiny")
    ids = list(range(5, 40))
    plain = LLM(str(path), max_model_len=64).score(ids)
    rules = _rules_of(tmp_path, "deepseek2", "experts: {defer: 1}\n")
    deferred = LLM(str(path), rules=rules, max_model_len=64).score(ids)
    assert np.isfinite(deferred).all() and np.abs(deferred - plain).max() > 0
    calls = _custom_calls(GGUFFile(path), "cuda", StepBucket(1, 0, 0, 8), "gpu", rules)
    assert calls <= set(_native.cuda_ffi_targets())
    for section, match in (("experts: {defer: 4}\n", r"defer: 4 of the 4 experts"),
                           ("experts: {defer: -1}\n", r"defer: expected a number")):
        with pytest.raises(RulesError, match=match):
            LLM(str(path), rules=_rules_of(tmp_path, "deepseek2", section), max_model_len=64)


# ---- prefill on the device, experts streamed ---------------------------------------------

def test_prefill_of_min_tokens_streams_the_experts_to_the_device(tmp_path, tmp_path_factory):
    """`device_prefill_min_tokens: 32`: a 40-token prompt (bucket of 64) runs every routed
    expert on the device from host-memory weights (Q8_0 codes kept), scoring as the all-device
    program; at 128 the same prompt stays on the host experts and scores as they do; decode
    runs the host experts either way. Lowered for CUDA, the prefill step copies the layer's
    experts (XLA's device placement) and calls no host MoE, the decode step does."""
    import gguf
    from ktjax import _native
    from ktjax.engine.buckets import StepBucket
    path = write_tiny_gguf(tmp_path_factory.mktemp("pf") / "q8.gguf", "qwen3moe", n_experts=E,
                           n_used=4, n_layers=3, hidden=H, expert_ffn=I, seed=2,
                           expert_qtype=gguf.GGMLQuantizationType.Q8_0)
    ids = list(range(5, 45))
    host = LLM(str(path), rules="qwen3moe", max_model_len=64).score(ids)
    device = LLM(str(path), rules="device", max_model_len=64).score(ids)
    assert np.abs(host - device).max() > 1e-3           # the host kernel's int8 activations
    rules = _rules_of(tmp_path, "qwen3moe", "experts: {device_prefill_min_tokens: 32}\n")
    streamed = LLM(str(path), rules=rules, max_model_len=64)
    hybrid = streamed.engine.params["layers"]["ffn_exps"]
    assert hybrid.streams(64) and not hybrid.streams(16)
    assert all(getattr(a, "sharding").memory_kind == "pinned_host"
               for a in jax.tree.leaves(hybrid.stream))
    np.testing.assert_allclose(streamed.score(ids), device, atol=1e-5)
    out = streamed.generate([ids[:5]], SamplingParams(max_tokens=4, temperature=0,
                                                      ignore_eos=True))
    assert len(out[0].token_ids) == 4
    above = _rules_of(tmp_path, "qwen3moe", "experts: {device_prefill_min_tokens: 128}\n")
    np.testing.assert_allclose(LLM(str(path), rules=above, max_model_len=64).score(ids), host,
                               atol=1e-5)
    f = GGUFFile(path)
    prefill = _custom_calls(f, "cuda", StepBucket(0, 1, 64, 8), "gpu", rules)
    assert "annotate_device_placement" in prefill and "ktjax_moe_submit" not in prefill
    decode = _custom_calls(f, "cuda", StepBucket(1, 0, 0, 8), "gpu", rules)
    assert "ktjax_moe_submit" in decode
    assert (prefill | decode) <= set(_native.cuda_ffi_targets()) | XLA_TARGETS
    with pytest.raises(RulesError, match=r"device_prefill_min_tokens: expected a number"):
        hx.read_placement(_rules_of(tmp_path, "qwen3moe",
                                    "experts: {device_prefill_min_tokens: -4}\n"), 3, E, [0, 1, 2])


@pytest.mark.gpu
def test_cuda_deferral_and_streamed_prefill(tmp_path, qwen3moe_paths):
    """On the GPU: defer 0 scores exactly as no deferral, defer 2 within a perturbation of it
    (the next layers miss the deferred experts) and generates; a prefill of at least
    device_prefill_min_tokens (experts copied from pinned host memory inside the step)
    scores as the all-device GPU program, and decode still runs the host experts."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    ids = list(range(5, 45))
    path = str(qwen3moe_paths[1])

    def llm(section: str | None):
        rules = _rules_of(tmp_path, "qwen3moe", section) if section else "qwen3moe"
        return LLM(path, rules=rules, max_model_len=64, dtype="float32")

    plain = llm(None).score(ids)
    np.testing.assert_array_equal(llm("experts: {defer: 0}\n").score(ids), plain)
    two = llm("experts: {defer: 2}\n")
    gap = np.abs(two.score(ids) - plain).max()
    assert 1e-3 < gap < 2.0
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert len(two.generate([ids[:5]], greedy)[0].token_ids) == 4
    ma.raise_host_errors()
    device = LLM(path, rules="device", max_model_len=64, dtype="float32").score(ids)
    streamed = llm("experts: {device_prefill_min_tokens: 32}\n")
    np.testing.assert_allclose(streamed.score(ids), device, atol=1e-3)
    assert len(streamed.generate([ids[:5]], greedy)[0].token_ids) == 4


def test_deferral_in_glm4moe(tmp_path):
    """GLM-4.5 (post-attention norm, a leading dense layer, sigmoid routing) defers through
    the same scan: defer 0 is the plain host experts exactly, defer 1 changes the logits, and
    its CUDA program calls only CUDA targets."""
    pytest.importorskip("transformers")
    from hf_gguf_models import hf_glm4moe, write_glm4moe_gguf
    from ktjax import _native
    from ktjax.engine.buckets import StepBucket
    path = write_glm4moe_gguf(tmp_path / "glm.gguf", hf_glm4moe())
    ids = list(range(5, 40))
    plain = LLM(str(path), rules="glm4moe", max_model_len=64).score(ids)
    zero = _rules_of(tmp_path, "glm4moe", "experts: {defer: 0}\n")
    np.testing.assert_array_equal(LLM(str(path), rules=zero, max_model_len=64).score(ids), plain)
    one = _rules_of(tmp_path, "glm4moe", "experts: {defer: 1}\n")
    assert np.abs(LLM(str(path), rules=one, max_model_len=64).score(ids) - plain).max() > 1e-4
    calls = _custom_calls(GGUFFile(path), "cuda", StepBucket(1, 0, 0, 8), "gpu", one)
    assert "ktjax_moe_submit" in calls and calls <= set(_native.cuda_ffi_targets())


def test_gpu_programs_relax_the_host_kernels_batch_invariance(monkeypatch):
    """Host experts of GPU programs may take the size-dependent (AMX tile) formula: the GPU
    step is not batch-invariant anyway. CPU programs and an explicit KTJAX_BATCH_INVARIANT
    keep it."""
    from types import SimpleNamespace
    from ktjax import _native
    was = _native.batch_invariant()
    try:
        _native.set_batch_invariant(True)
        monkeypatch.delenv("KTJAX_BATCH_INVARIANT", raising=False)
        hx.relax_batch_invariance(SimpleNamespace(platform="cpu"))
        assert _native.batch_invariant()
        monkeypatch.setenv("KTJAX_BATCH_INVARIANT", "1")
        hx.relax_batch_invariance(SimpleNamespace(platform="gpu"))
        assert _native.batch_invariant()
        monkeypatch.delenv("KTJAX_BATCH_INVARIANT")
        hx.relax_batch_invariance(SimpleNamespace(platform="gpu"))
        assert not _native.batch_invariant()
    finally:
        _native.set_batch_invariant(was)


def test_unrolled_layers_keep_the_hybrid_outputs(tmp_path, qwen3moe_paths, monkeypatch):
    """KTJAX_COMMAND_BUFFERS=layers (the decoder's layer loop unrolled): a split model with
    deferral (state carried from layer to layer) scores and generates as with the loop."""
    ids = list(range(5, 45))
    rules = _rules_of(tmp_path, "qwen3moe", "experts: {defer: 2, hot: {1: [0, 3]}}\n")
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    out = {}
    for mode in ("1", "layers"):
        monkeypatch.setenv("KTJAX_COMMAND_BUFFERS", mode)
        llm = LLM(str(qwen3moe_paths[1]), rules=rules, max_model_len=64)
        out[mode] = llm.score(ids), llm.generate([ids[:5]], greedy)[0].token_ids
        ma.raise_host_errors()
    np.testing.assert_allclose(out["layers"][0], out["1"][0], rtol=1e-5, atol=1e-5)
    assert out["layers"][1] == out["1"][1]

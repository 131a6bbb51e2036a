"""The Pallas paged attention kernel (kernels/paged_attention_gpu.py) against the jnp reference:
interpreted on CPU (CI), compiled on a CUDA GPU (marked gpu). Each case is one step of the
engine's layout: pages scattered in a two-layer cache, the kernel reading layer 1."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.errors import KernelError, KtjaxError
from ktjax.kernels import backends, kv_quant, paged_attention_gpu, paged_attention_ref

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


@dataclass(frozen=True)
class Case:
    """One step: rows with cache_lens and n_new new tokens each (the rest padding)."""

    cache_lens: tuple[int, ...]
    n_new: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    value_dim: int | None = None     # MLA: values_in_keys
    page: int = 16
    kv_dtype: str = "float32"
    window: int = 0
    softcap: float | None = None
    splits: int | None = None
    pages_per_block: int | None = None
    block_m: int | None = None
    sinks: bool = False              # gpt-oss: a learned logit per head
    combine: str = "pallas"
    key_rows: bool = False           # the cache addressed per key (a sweep knob)


CASES = {
    # decode rows at 0, odd and page-boundary lengths, group of 2, split-K over 3
    "decode": Case((0, 17, 48), (1, 1, 1), splits=3, pages_per_block=1),
    # a chunk of 5 over 20 cached tokens (causal within the chunk), head_dim 128, group 4
    "chunked_prefill": Case((20,), (5,), heads=8, head_dim=128, pages_per_block=2),
    # one decode row and one prefill chunk in the same step (padding after each row's tokens)
    "mixed": Case((33, 16), (1, 6), heads=6, kv_heads=2),
    # MQA over a head of 256, Gemma's sliding window and soft-capping
    "window_softcap": Case((40, 9), (3, 2), heads=4, kv_heads=1, head_dim=256, window=8,
                           softcap=5.0, splits=2),
    # group of 3 (SmolLM2), more splits than the context has blocks (empty splits)
    "group3_many_splits": Case((31,), (1,), heads=9, kv_heads=3, splits=8, page=8),
    # MLA: one latent "head" of 32 + 16 rope dims, values = the first 32
    "mla": Case((21, 0), (1, 3), heads=4, kv_heads=1, head_dim=48, value_dim=32, splits=2),
    # ... and of 32 + 8 (the tiny DeepSeek's): the rope part is read widened to 16
    "mla_narrow_rope": Case((18,), (1,), heads=2, kv_heads=1, head_dim=40, value_dim=32),
    # a chunk of 70 in blocks of 16 query rows: several row blocks, 2 blocks of new keys
    "long_chunk": Case((5,), (70,), heads=2, kv_heads=2, head_dim=16, block_m=16),
    "bf16": Case((19, 35), (2, 1), kv_dtype="bfloat16"),
    "int8_decode": Case((0, 47, 64), (1, 1, 1), heads=8, kv_dtype="int8", splits=2),
    "int8_prefill_window": Case((26,), (4,), kv_dtype="int8", window=10),
    "int8_mla": Case((37,), (2,), heads=8, kv_heads=1, head_dim=48, value_dim=32,
                     kv_dtype="int8"),
    # gpt-oss: sinks over split partials (counted once) with a window, and in one split
    "sinks_decode": Case((0, 17, 48), (1, 1, 1), heads=8, splits=3, window=16, sinks=True,
                         pages_per_block=1),
    "sinks_prefill_bf16": Case((20,), (5,), heads=8, kv_dtype="bfloat16", sinks=True),
    # 33 splits of a 4-token chunk: the combine's tile holds 4 of the 16 rows and 16 of the
    # 64 dims (row and column blocks), most splits empty
    "combine_tiles": Case((40,), (4,), heads=8, kv_heads=2, splits=33, pages_per_block=1),
    # the cache addressed per key instead of per page, int8 with splits and a window
    "key_rows_int8": Case((26, 47), (1, 1), heads=8, kv_dtype="int8", window=20, splits=2,
                          key_rows=True),
    # the split partials merged by XLA (the benchmark's comparison knob)
    "xla_combine": Case((29, 3), (1, 2), heads=6, kv_heads=2, splits=2, combine="xla"),
}
# Every case again with the cache addressed per key (key_rows: faster than per-page loads at
# every bf16 context on the H100, docs/kernel-notes.md), the evidence for making it the
# default.
ALL_CASES = {**CASES, **{f"{name}+key_rows": replace(case, key_rows=True)
                         for name, case in CASES.items() if not case.key_rows}}


def _cache(rng, shape, kv_dtype):
    x = rng.standard_normal(shape, np.float32)
    if kv_dtype == "int8":
        return kv_quant.Int8Pages(*kv_quant.quantize(jnp.asarray(x)))
    return jnp.asarray(x, kv_dtype)


def make_step(case: Case, seed: int = 0):
    """(args, kwargs) of one attention call in the engine's layout."""
    rng = np.random.default_rng(seed)
    b, t = len(case.cache_lens), max(case.n_new)
    mla = case.value_dim is not None
    n_tables = max(1, max(-(-n // case.page) for n in case.cache_lens))
    n_pages = 1 + b * n_tables + 3
    pages = rng.permutation(np.arange(1, n_pages))[:b * n_tables].reshape(b, n_tables)
    for i, n in enumerate(case.cache_lens):              # unused table entries: page 0
        pages[i, -(-n // case.page):] = 0
    positions = np.full((b, t), -1, np.int32)
    for i, (n, k) in enumerate(zip(case.cache_lens, case.n_new)):
        positions[i, :k] = n + np.arange(k)
    f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    vd = 0 if mla else case.head_dim
    cache_shape = (2, n_pages, case.page, case.kv_heads)
    k_cache = _cache(rng, (*cache_shape, case.head_dim), case.kv_dtype)
    v_cache = jnp.zeros((*cache_shape, 0), jnp.float32) if mla else \
        _cache(rng, (*cache_shape, vd), case.kv_dtype)
    args = (f(b, t, case.heads, case.head_dim), f(b, t, case.kv_heads, case.head_dim),
            None if mla else f(b, t, case.kv_heads, vd), k_cache, v_cache, jnp.int32(1),
            jnp.asarray(pages, jnp.int32), jnp.asarray(case.cache_lens, jnp.int32),
            jnp.asarray(positions))
    kw = dict(scale=case.head_dim ** -0.5, sliding_window=case.window,
              logit_softcap=case.softcap)
    if case.sinks:     # around the scores' size, so the sink takes a real share
        kw["sinks"] = jnp.asarray(rng.standard_normal(case.heads) * 2, jnp.float32)
    if mla:
        kw["values_in_keys"] = case.value_dim
    return args, kw


def check_case(case: Case, interpret: bool) -> None:
    args, kw = make_step(case)
    want = np.asarray(paged_attention_ref.paged_attention(*args, **kw))
    got = np.asarray(jax.jit(lambda *a: paged_attention_gpu.paged_attention(
        *a, **kw, n_splits=case.splits, pages_per_block=case.pages_per_block,
        block_m=case.block_m, combine=case.combine, key_rows=case.key_rows,
        interpret=interpret))(*args))
    tol = 2e-2 if case.kv_dtype == "bfloat16" and not interpret else 2e-4
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    padding = np.asarray(args[-1]) < 0
    assert not got[padding].any()                     # padding queries come out zero


@pytest.mark.parametrize("name", ALL_CASES)
def test_kernel_matches_reference_interpreted(name):
    check_case(ALL_CASES[name], interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL_CASES)
def test_kernel_matches_reference_on_gpu(name):
    with jax.default_device(jax.devices("gpu")[0]):
        check_case(ALL_CASES[name], interpret=False)


@pytest.mark.parametrize("name", ["window_softcap", "int8_mla", "sinks_decode",
                                  "sinks_prefill_bf16", "mla576_int8_chunk", "key_rows_int8"])
def test_triton_lowering_succeeds_without_a_gpu(name):
    """Lowering for CUDA runs the Triton lowering rules here too: an op the rules lack, or
    a block that is not a power of 2, fails in CI instead of on the GPU machine."""
    case = CASES.get(name) or FITTED[name]
    args, kw = make_step(case)
    f = jax.jit(lambda *a: paged_attention_gpu.paged_attention(
        *a, **kw, n_splits=case.splits, key_rows=case.key_rows, interpret=False))
    assert "__gpu$xla.gpu.triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", kv_quant.KV_CACHE_DTYPES)
def test_auto_backend_on_gpu_is_pallas(kv_dtype):
    assert backends.pallas_probe_failure(kv_dtype) is None
    assert backends.get_backend("auto", "gpu", kv_dtype).name == "pallas"


def test_probe_passes_interpreted():
    """The probe itself (it runs wherever the default device is; here interpreted)."""
    assert backends.pallas_probe_failure("int8") is None


def test_key_parts_are_powers_of_two():
    assert paged_attention_gpu.key_parts(128, None) == ((0, 128),)
    assert paged_attention_gpu.key_parts(576, 512) == ((0, 512), (512, 64))
    assert paged_attention_gpu.key_parts(40, 32) == ((0, 32), (24, 16))   # reads 8 twice
    assert paged_attention_gpu.key_parts(112, 64) == ((0, 64), (48, 64))


def test_unsupported_shape_falls_back_to_reference_with_a_warning():
    case = Case((13,), (2,), page=12)               # page size 12: no power-of-2 block
    args, kw = make_step(case)
    assert "page size 12" in paged_attention_gpu.unsupported_reason(64, 64, 12, None)
    with pytest.raises(KernelError, match="page size 12"):
        paged_attention_gpu.paged_attention(*args, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = backends.PALLAS.attend(*args, **kw)
    assert any("page size 12" in str(w.message) for w in caught)
    np.testing.assert_allclose(got, paged_attention_ref.paged_attention(*args, **kw))


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(KtjaxError, match=r"unknown attention backend 'triton'.*'pallas'"):
        backends.get_backend("triton", "gpu")


def test_int8_write_roundtrip_and_cpu_refusal():
    rng = np.random.default_rng(1)
    cache = kv_quant.zeros((1, 3, 4, 2, 32), "int8")
    new = jnp.asarray(rng.standard_normal((1, 1, 2, 2, 32), np.float32))
    slots = jnp.asarray([[5, 6]], jnp.int32)                 # page 1, offsets 1 and 2
    k, _ = paged_attention_ref.write_kv(cache, cache, slots, new, new)
    back = kv_quant.dequantize(k.values[0, 1, 1:3], k.scales[0, 1, 1:3])
    err = np.abs(np.asarray(back) - np.asarray(new[0, 0]))
    assert err.max() <= np.abs(np.asarray(new)).max() / 127 / 2 + 1e-6
    with pytest.raises(KernelError, match="int8"):
        backends.get_backend("cpu", "cpu", "int8")
    assert backends.get_backend("auto", "cpu", "int8").name == "reference"


@pytest.mark.parametrize("arch,kv_dtype", [("llama", "float32"), ("llama", "int8"),
                                           ("gemma3", "float32")])
def test_engine_generates_with_the_pallas_backend(tiny_llama_path, tmp_path, arch, kv_dtype):
    """The kernel inside the engine's scanned layers (traced layer index and, for Gemma 3,
    traced window of 8; padded buckets; prefill then decode steps) gives the reference
    backend's tokens and log-probabilities."""
    from tiny_models import write_tiny_gguf

    from ktjax import LLM, SamplingParams
    path = tiny_llama_path if arch == "llama" else write_tiny_gguf(tmp_path / "g.gguf", arch)
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=True, ignore_eos=True)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 9, 11, 13, 17, 19, 23, 29, 31, 37], [3, 1, 4]]
    outs = {}
    for attention in ("reference", "pallas"):
        llm = LLM(str(path), max_model_len=64, kv_cache_tokens=256,
                  host_linears=False, dtype="float32", attention=attention,
                  kv_cache_dtype=kv_dtype)
        outs[attention] = llm.generate(prompts, params)
    for ref, got in zip(outs["reference"], outs["pallas"]):
        assert got.token_ids == ref.token_ids
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)


# --- tiling against shared memory (the first GPU run: head_dim 256 asked for 278528 bytes) --

H100_SMEM = 227 * 1024
SM86_SMEM = 99 * 1024


def _shape(head_dim, value_dim, values_in_keys, kv_dtype, compute_dtype, page=16):
    return dict(page_size=page, head_dim=head_dim, value_dim=value_dim,
                values_in_keys=values_in_keys, kv_itemsize=jnp.dtype(kv_dtype).itemsize,
                new_itemsize=jnp.dtype(compute_dtype).itemsize,
                compute_itemsize=jnp.dtype(compute_dtype).itemsize,
                int8=jnp.dtype(kv_dtype) == jnp.int8)


# The tilings nearest the shared-memory limit: head_dim 256 (Gemma 3) and MLA's 512 + 64,
# decode and 64-token chunks, every page dtype; too slow to interpret at these sizes.
FITTED = {
    "hd256_f32_chunk": Case((40,), (64,), heads=8, kv_heads=1, head_dim=256),
    "hd256_int8_chunk": Case((100,), (64,), heads=8, kv_heads=2, head_dim=256,
                             kv_dtype="int8"),
    "hd256_bf16_decode": Case((300, 17), (1, 1), heads=8, kv_heads=1, head_dim=256,
                              kv_dtype="bfloat16"),
    "mla576_bf16_chunk": Case((50,), (64,), heads=16, kv_heads=1, head_dim=576,
                              value_dim=512, kv_dtype="bfloat16"),
    "mla576_f32_decode": Case((300,), (1,), heads=16, kv_heads=1, head_dim=576,
                              value_dim=512),
    "mla576_int8_chunk": Case((70,), (64,), heads=16, kv_heads=1, head_dim=576,
                              value_dim=512, kv_dtype="int8"),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", FITTED)
def test_fitted_tilings_run_on_gpu(name):
    with jax.default_device(jax.devices("gpu")[0]):
        check_case(FITTED[name], interpret=False)


def test_estimate_covers_what_triton_asked_on_the_h100():
    """window_softcap's tiling before the fit (head_dim 256, float32, 16 rows, 4 pages of
    16 keys, 16 new keys, 2 stages): Triton asked for 278528 bytes."""
    blocks = paged_attention_gpu.Blocks(16, 4, 16, num_warps=4, num_stages=2)
    need = paged_attention_gpu.shared_memory_bytes(
        blocks, **_shape(256, 256, None, jnp.float32, jnp.float32))
    assert 278528 <= need <= 278528 * 1.1


@pytest.mark.parametrize("head_dim,values_in_keys", [(64, None), (128, None), (256, None),
                                                     (576, 512)])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_chosen_blocks_fit_shared_memory(head_dim, values_in_keys, kv_dtype):
    """Every tiling the engine can get (decode rows of a group of 8, a 512-token chunk) fits
    the H100's and an sm_86's shared memory; on the H100 the bf16/int8 defaults stand."""
    dv = values_in_keys or head_dim
    compute = jnp.float32 if kv_dtype == "float32" else jnp.bfloat16
    shape = _shape(head_dim, dv, values_in_keys, kv_dtype, compute)
    for rows, tokens in ((8, 1), (8 * 512, 512)):
        for limit in (H100_SMEM, SM86_SMEM):
            blocks = paged_attention_gpu.choose_blocks(
                rows, tokens, 16, head_dim, dv, values_in_keys, kv_dtype=kv_dtype,
                new_dtype=compute, compute_dtype=compute, limit=limit)
            assert paged_attention_gpu.shared_memory_bytes(blocks, **shape) <= limit
            default = paged_attention_gpu.default_blocks(rows, tokens, 16, head_dim, dv)
            if paged_attention_gpu.shared_memory_bytes(default, **shape) <= limit:
                assert blocks == default
            else:
                smaller = [getattr(blocks, f) <= getattr(default, f) for f in
                           ("block_m", "pages_per_block", "block_new", "num_stages")]
                assert all(smaller) and blocks != default
            if kv_dtype != "float32" and limit == H100_SMEM:
                assert blocks == default


def test_head_dim_256_float32_is_shrunk_on_the_h100():
    blocks = paged_attention_gpu.choose_blocks(12, 3, 16, 256, 256, None,
                                               kv_dtype=jnp.float32, new_dtype=jnp.float32,
                                               compute_dtype=jnp.float32, limit=H100_SMEM)
    assert blocks.pages_per_block == 2 and blocks.num_stages == 2


def test_given_knobs_are_kept_and_an_oversized_tiling_is_refused():
    kw = dict(kv_dtype=jnp.float32, new_dtype=jnp.float32, compute_dtype=jnp.float32,
              limit=H100_SMEM)
    blocks = paged_attention_gpu.choose_blocks(12, 3, 16, 256, 256, None, pages_per_block=4,
                                               **kw)
    assert blocks.pages_per_block == 4 and blocks.num_stages == 1    # stages gave way
    with pytest.raises(KernelError, match="shared memory"):
        paged_attention_gpu.choose_blocks(12, 3, 16, 256, 256, None, pages_per_block=4,
                                          num_stages=2, **kw)


def test_a_page_too_big_for_shared_memory_is_unsupported():
    assert paged_attention_gpu.unsupported_reason(576, 512, 16, 512) is None
    reason = paged_attention_gpu.unsupported_reason(576, 512, 128, 512, kv_itemsize=4)
    assert "shared memory" in reason and "232448" in reason


def test_shared_memory_table_by_compute_capability():
    from ktjax.kernels import pallas_triton
    assert pallas_triton.limit_for_capability("9.0") == 232448
    assert pallas_triton.limit_for_capability("8.6") == 101376
    assert pallas_triton.limit_for_capability("8.0") == 166912
    assert pallas_triton.limit_for_capability("13.7") == pallas_triton.UNKNOWN_GPU_SHARED_MEMORY
    assert pallas_triton.limit_for_capability(None) == pallas_triton.UNKNOWN_GPU_SHARED_MEMORY
    if not HAS_GPU:
        assert pallas_triton.shared_memory_limit() == 232448


# --- what XLA runs around the kernel: nothing but free reshapes ---------------------------

def _ops_around_the_kernel(b: int, t: int, kv_dtype: str, **knobs) -> tuple[int, list[str]]:
    """(Pallas custom calls, the other StableHLO ops but constants) of one 8B-shaped layer
    lowered for CUDA."""
    import re
    heads, kv, hd, page, ctx = 32, 8, 128, 16, 4096
    shape = (2, b * ctx // page + 1, page, kv, hd)
    S = jax.ShapeDtypeStruct
    cache = kv_quant.Int8Pages(S(shape, jnp.int8), S(shape[:-1], jnp.float32)) \
        if kv_dtype == "int8" else S(shape, jnp.bfloat16)
    args = (S((b, t, heads, hd), jnp.bfloat16), S((b, t, kv, hd), jnp.bfloat16),
            S((b, t, kv, hd), jnp.bfloat16), cache, cache, S((), jnp.int32),
            S((b, ctx // page), jnp.int32), S((b,), jnp.int32), S((b, t), jnp.int32),
            S((heads,), jnp.bfloat16))
    f = jax.jit(lambda *a: paged_attention_gpu.paged_attention(
        *a[:-1], scale=hd ** -0.5, sinks=a[-1], interpret=False, **knobs))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    ops = re.findall(r"= \"?(stablehlo\.[a-z_]+)", text)
    return ops.count("stablehlo.custom_call"), sorted(
        o for o in ops if o not in ("stablehlo.custom_call", "stablehlo.constant"))


@pytest.mark.parametrize("b,t,kv_dtype,kernels", [(1, 1, "bfloat16", 2), (1, 1, "int8", 2),
                                                  (64, 1, "bfloat16", 1),
                                                  (1, 512, "bfloat16", 1)])
def test_no_copies_around_the_kernel(b, t, kv_dtype, kernels):
    """q, the step's keys, positions and tables are read in place and the output written in
    place: no pad, transpose or convert of anything (a copy of the cache would be fatal),
    only reshapes XLA makes bitcasts. Split decode adds the combine kernel; the version
    before had 49 ops around one kernel (5 pads, 4 transposes, the combine in jnp)."""
    n_calls, others = _ops_around_the_kernel(b, t, kv_dtype)
    assert n_calls == kernels
    assert set(others) <= {"stablehlo.reshape"}, others
    assert len(others) <= 8
    n_calls, others = _ops_around_the_kernel(b, t, kv_dtype, combine="xla")
    if kernels == 2:      # the comparison knob: XLA's combine shows as ops again
        assert n_calls == 1 and "stablehlo.reduce" in others

"""Batch invariance: a row's (a token's, a prompt's) result must not depend on what else is in
its step, on the step's token count, or on the kernel path that count selects (decode tiles
or prefill tiles, threading, attention key splits, padding to a bucket).

Kernel level, on every ISA level the machine has: each row computed alone is bit-identical to
the same row computed among others (linear, fused MoE, paged attention, RMSNorm). End to end:
greedy tokens and logits of prompts run alone equal those of the same prompts run together,
for a tiny model (CI speed) and SmolLM2 with the default CPU rules.
"""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_host_linear import random_gguf

from ktjax.kernels.rms_norm import rms_norm_host
from ktjax.host import linear as hl
from ktjax.host import moe as hm
from ktjax.kernels import paged_attention_cpu

T = gguf.GGMLQuantizationType
ROW_COUNTS = (2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 64, 70)


@pytest.fixture(autouse=True)
def invariant_mode():
    """The default mode, whatever KTJAX_BATCH_INVARIANT says (it only matters on AMX)."""
    from ktjax import _native
    was = _native.batch_invariant()
    _native.set_batch_invariant(True)
    yield
    _native.set_batch_invariant(was)


def assert_rows_alone_equal(f, x: np.ndarray) -> None:
    """f(x[:m]) row by row equals f(x[i:i + 1]) for every m in ROW_COUNTS, bit for bit."""
    alone = np.concatenate([f(x[i:i + 1]) for i in range(len(x))])
    for m in ROW_COUNTS:
        together = f(x[:m])
        bad = np.flatnonzero(np.any(together != alone[:m], axis=tuple(range(1, together.ndim))))
        assert bad.size == 0, (f"rows {bad.tolist()} of {m} differ from the same rows alone "
                               f"(max |diff| {np.abs(together - alone[:m]).max():.3g})")


GGUF_WEIGHTS = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", GGUF_WEIGHTS, ids=lambda t: t.name)
def test_linear_gguf_rows_alone(isa, qtype, store):
    n, k = 200, 512  # 13 row blocks: pairs and a lone block, a partial last block
    h = hl.pack_gguf_weight(random_gguf(qtype, n, k, seed=1), int(qtype), (n, k))
    store.append(h)
    x = np.random.default_rng(2).standard_normal((max(ROW_COUNTS), k), dtype=np.float32)
    assert_rows_alone_equal(lambda xs: hl.linear_forward(xs, h), x)


@pytest.mark.parametrize("fmt", hl.FLOAT_FORMATS)
def test_linear_float_formats_rows_alone(isa, fmt, store):
    rng = np.random.default_rng(3)
    n, k = 72, 300  # K not a multiple of the group: zero-padded groups
    h = hl.pack_float_weight(rng.standard_normal((n, k), dtype=np.float32), fmt)
    store.append(h)
    x = rng.standard_normal((max(ROW_COUNTS), k), dtype=np.float32)
    assert_rows_alone_equal(lambda xs: hl.linear_forward(xs, h), x)


def test_linear_large_call_rows_alone(isa, store):
    """Enough work for the pool (pieces of row blocks over threads, prepare threaded over
    tokens) and token blocks of the prefill tiles."""
    rng = np.random.default_rng(4)
    n, k = 1024, 1024
    h = hl.pack_gguf_weight(random_gguf(T.Q4_K, n, k, seed=5), int(T.Q4_K), (n, k))
    store.append(h)
    x = rng.standard_normal((600, k), dtype=np.float32)
    together = hl.linear_forward(x, h)
    for i in (0, 1, 299, 599):
        np.testing.assert_array_equal(together[i:i + 1], hl.linear_forward(x[i:i + 1], h))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8_row", "bf16"])
def test_moe_tokens_alone(isa, fmt, store):
    """A token's MoE output is the same alone as among tokens that crowd its experts (an
    expert's token count picks its tiles) or leave them to it."""
    rng = np.random.default_rng(6)
    E, H, I, k = 6, 128, 96, 2
    gate, up = (rng.standard_normal((E, I, H), dtype=np.float32) * 0.2 for _ in range(2))
    down = rng.standard_normal((E, H, I), dtype=np.float32) * 0.2
    h = hm.pack_experts_float(gate, up, down, fmt)
    store.append(h)
    tokens = max(ROW_COUNTS)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    # Skewed routing: expert 0 takes most tokens, expert 5 few.
    ids = np.stack([rng.choice(E, k, replace=False, p=[.5, .2, .1, .1, .05, .05])
                    for _ in range(tokens)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)

    def run(rows: slice) -> np.ndarray:
        return hm.moe_forward(x[rows], ids[rows], wts[rows], h)

    alone = np.concatenate([run(slice(i, i + 1)) for i in range(tokens)])
    for m in ROW_COUNTS:
        np.testing.assert_array_equal(run(slice(0, m)), alone[:m], err_msg=f"{m} tokens")


def test_rms_norm_rows_alone():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((max(ROW_COUNTS), 576), dtype=np.float32) * 3
    w = rng.standard_normal(576, dtype=np.float32)
    f = jax.jit(lambda xs: rms_norm_host(xs, w, 1e-5))
    assert_rows_alone_equal(lambda xs: np.asarray(f(xs)), x)


# ---- attention ---------------------------------------------------------------------------

PAGE = 16
KV, HEADS, HD = 2, 8, 64


def _cache(rng, layers=2, pages=256):
    f = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    return f(layers, pages, PAGE, KV, HD), f(layers, pages, PAGE, KV, HD)


def _attend(rows, k_cache, v_cache, tokens: int, pages: int) -> np.ndarray:
    """rows: (cache_len, page table, q [n, H, hd], k [n, KV, hd], v [n, KV, hd]) padded to
    a step of len(rows) rows x `tokens` tokens and `pages` context pages."""
    b = len(rows)
    q = np.zeros((b, tokens, HEADS, HD), np.float32)
    k = np.zeros((b, tokens, KV, HD), np.float32)
    v = np.zeros((b, tokens, KV, HD), np.float32)
    pos = np.full((b, tokens), -1, np.int32)
    tables = np.zeros((b, pages), np.int32)
    lens = np.zeros(b, np.int32)
    for r, (start, table, qr, kr, vr) in enumerate(rows):
        n = len(qr)
        q[r, :n], k[r, :n], v[r, :n] = qr, kr, vr
        pos[r, :n] = np.arange(start, start + n)
        used = min(len(table), pages)
        tables[r, :used] = table[:used]
        lens[r] = start
    out = jax.jit(lambda *a: paged_attention_cpu.paged_attention(*a, scale=HD ** -0.5))(
        q, k, v, k_cache, v_cache, jnp.int32(1), tables, lens, pos)
    return np.asarray(out)


def _row(rng, start: int, n: int, first_page: int):
    pages = -(-(start + n) // PAGE)
    table = np.arange(first_page, first_page + pages, dtype=np.int32)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    return start, table, f(n, HEADS, HD), f(n, KV, HD), f(n, KV, HD)


def test_attention_prefill_rows_alone(isa):
    """Prefill chunks of mixed lengths and cached contexts (some past the 256-key split)
    alone, each in its own bucket, vs together in a larger one."""
    rng = np.random.default_rng(8)
    k_cache, v_cache = _cache(rng)
    specs = [(0, 5), (0, 40), (300, 17), (20, 1), (600, 64)]  # (cached, new tokens)
    rows, page = [], 1
    for start, n in specs:
        rows.append(_row(rng, start, n, page))
        page += len(rows[-1][1])
    together = _attend(rows, k_cache, v_cache, tokens=64, pages=64)
    for r, row in enumerate(rows):
        n, cached_pages = len(row[2]), -(-row[0] // PAGE)
        for tokens in sorted({16 * -(-n // 16), 64}):
            alone = _attend([row], k_cache, v_cache, tokens=tokens, pages=max(8, cached_pages))
            np.testing.assert_array_equal(alone[0, :n], together[r, :n],
                                          err_msg=f"row {r} alone in {tokens} tokens")


def test_attention_decode_rows_alone(isa):
    """Decode: one query per row, contexts from 3 to 1000 keys; alone (B 1, few pages, work
    too small to thread) vs among 9 rows with 64 pages (key splits, threads)."""
    rng = np.random.default_rng(9)
    k_cache, v_cache = _cache(rng)
    rows, page = [], 1
    for start in (3, 16, 255, 256, 257, 511, 700, 1000, 40):
        rows.append(_row(rng, start, 1, page))
        page += len(rows[-1][1])
    together = _attend(rows, k_cache, v_cache, tokens=1, pages=64)
    for r, row in enumerate(rows):
        alone = _attend([row], k_cache, v_cache, tokens=1, pages=len(row[1]))
        np.testing.assert_array_equal(alone[0], together[r], err_msg=f"row {r}")


# ---- end to end ----------------------------------------------------------------------------

def _generate(llm, prompts: list[list[int]], n: int):
    from ktjax import SamplingParams
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = llm.generate(prompts, params)
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


def assert_alone_equals_together(llm, prompts: list[list[int]], n: int) -> None:
    """Greedy tokens and their log-probabilities, bit for bit: each prompt alone (its own
    prefill buckets, decode at 1 row) and all together (shared buckets, padding rows)."""
    together = _generate(llm, prompts, n)
    for i, p in enumerate(prompts):
        (alone_ids, alone_lp), = _generate(llm, [p], n)
        ids, lp = together[i]
        assert alone_ids == ids, f"prompt {i} ({len(p)} tokens): greedy tokens differ"
        assert alone_lp == lp, f"prompt {i}: log-probabilities differ"


def _prompts(rng, lengths, vocab):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(qtype=T.Q4_1)),
    ("qwen3moe", dict(qtype=T.Q8_0, n_experts=8, n_used=2)),
    ("gemma3", dict(qtype=T.Q8_0)),
], ids=["llama-q4_1", "qwen3moe", "gemma3"])
def test_tiny_model_alone_equals_together(tmp_path, arch, kw):
    """The default CPU rules (every matrix in the host kernels); prompts of 3 to 700 tokens:
    decode-sized and prefill-sized first chunks, a chunked prefill (512 + 188)."""
    from tiny_models import write_tiny_gguf

    from ktjax import LLM
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, context_length=1024, **kw)
    llm = LLM(str(path), max_model_len=1024, kv_cache_tokens=4096)
    prompts = _prompts(np.random.default_rng(10), (3, 17, 40, 9, 700), llm.engine.programs.vocab)
    assert_alone_equals_together(llm, prompts, 12)


def test_smollm2_alone_equals_together():
    """SmolLM2-135M (Q4_1), default CPU rules: 7 of 10 prompts gave other greedy text together
    than alone when the attention switched to XLA for chunks over 16 tokens, key splits
    followed the step's size and XLA's RMSNorm reduced rows in an order set by the batch."""
    from ktjax import LLM
    llm = LLM("smollm2-135m", max_model_len=1024, kv_cache_tokens=4096)
    texts = ["The capital of France is", "def fibonacci(n):",
             "Explain how a transistor works in simple terms, for a curious child who likes "
             "building things and asks why a lot.", "1, 2, 3, 4,",
             "Once upon a time in a small village there lived an old clockmaker who"]
    prompts = [llm.tokenizer.encode(t) for t in texts]
    prompts.append(_prompts(np.random.default_rng(11), (300,), 49000)[0])  # a key split
    assert_alone_equals_together(llm, prompts, 24)


def test_stacked_matvec_rows_alone(isa):
    """LayerStack matmuls (MoE routers, MLA up-projections on CPU): the host kernel for every
    row count, blocked over input rows."""
    from ktjax.host.stacked import stacked_matvec
    rng = np.random.default_rng(12)
    stack = jnp.asarray(rng.standard_normal((2, 3, 40, 72), dtype=np.float32))
    x = rng.standard_normal((max(ROW_COUNTS), 3, 72), dtype=np.float32)
    f = jax.jit(lambda xs: stacked_matvec(xs, stack, jnp.int32(1)))
    assert_rows_alone_equal(lambda xs: np.asarray(f(xs)), x)


def test_int8_row_same_on_every_level(store):
    """int8_row weights: every level sums all of K in int32 and scales once, as the AMX tiles
    do, so results agree bit for bit across levels (and AMX needs no other formula)."""
    from isa_levels import ISAS
    rng = np.random.default_rng(13)
    h = hl.pack_float_weight(rng.standard_normal((72, 300), dtype=np.float32), "int8_row")
    store.append(h)
    x = rng.standard_normal((20, 300), dtype=np.float32)
    want = hl.linear_reference(x, h)
    for level in ISAS:
        np.testing.assert_array_equal(hl.linear_forward(x, h, level), want, err_msg=level)

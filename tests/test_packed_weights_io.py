"""Packed weights out of and back into the native store (cpu_kernels/store/serialize.*): XXH64
against a Python reference, a round trip that decodes to the same matrix, and refusal of
layouts no packer makes, wrong byte counts, bad digests and taken handles."""
import numpy as np
import pytest

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.host import linear as hl
from ktjax.host import moe as hm
from ktjax.host.native import native_call

M = 2 ** 64 - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def _round(acc, v):
    return _rotl((acc + v * P2) & M, 31) * P1 & M


def xxh64_reference(data: bytes, seed: int = 0) -> int:
    """XXH64 as its specification writes it (scalar, arbitrary-precision ints masked)."""
    n, i = len(data), 0
    u64 = lambda j: int.from_bytes(data[j:j + 8], "little")  # noqa: E731
    if n >= 32:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed, (seed - P1) & M]
        while i + 32 <= n:
            v = [_round(v[j], u64(i + 8 * j)) for j in range(4)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M
        for x in v:
            h = ((h ^ _round(0, x)) * P1 + P4) & M
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, u64(i)), 27) * P1 + P4) & M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * P1 & M), 23) * P2 + P3) & M
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * P5 & M), 11) * P1 & M
        i += 1
    h ^= h >> 33
    h = h * P2 & M
    h ^= h >> 29
    h = h * P3 & M
    return h ^ (h >> 32)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 31, 32, 33, 100, 1000])
def test_hash64_is_xxh64(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert _native.hash64(data) == xxh64_reference(data.tobytes())
    # chunked: XXH64 of each piece's digest, little-endian
    chunk = 48
    pieces = [xxh64_reference(data[i:i + chunk].tobytes()) for i in range(0, n, chunk)]
    want = xxh64_reference(b"".join(p.to_bytes(8, "little") for p in pieces)) \
        if n > chunk else xxh64_reference(data.tobytes())
    assert _native.hash64(data, chunk) == want


def test_known_xxh64_vectors():
    assert _native.hash64(np.frombuffer(b"", np.uint8)) == 0xEF46DB3751D8E999
    assert _native.hash64(np.frombuffer(b"abc", np.uint8)) == 0x44BC2CF5AD770999


def _export(h):
    layouts = _native.packed_layout(h)
    buffers = [np.array(_native.packed_bytes(h, i)) for i in range(len(layouts))]
    return layouts, buffers, [_native.hash64(b, 4096) for b in buffers]


@pytest.mark.parametrize("fmt", ["int8", "int8_row", "int4", "bf16"])
def test_round_trip_decodes_to_the_same_matrix(fmt, store):
    w = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    h = hl.pack_float_weight(w, fmt)
    store.append(h)
    layouts, buffers, digests = _export(h)
    h2 = native_call(_native.adopt_packed, layouts, buffers, digests, 0, 4096)
    store.append(h2)
    np.testing.assert_array_equal(hl.unpack_weight(h2), hl.unpack_weight(h))
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_array_equal(hl.linear_forward(x, h2), hl.linear_forward(x, h))


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ2_XS", "MXFP4"])
def test_table_layouts_round_trip(qtype, store):
    """IQ weights (int4 indices into their type's table) come back with the table."""
    import gguf
    from test_iq_host import random_iq
    t = gguf.GGMLQuantizationType[qtype]
    h = hl.pack_gguf_weight(random_iq(t, 20, 256), int(t), (20, 256))
    store.append(h)
    layouts, buffers, digests = _export(h)
    h2 = native_call(_native.adopt_packed, layouts, buffers, digests, 0, 4096)
    store.append(h2)
    assert hl.weight_info(h2)["format"] == hl.weight_info(h)["format"]
    np.testing.assert_array_equal(hl.unpack_weight(h2), hl.unpack_weight(h))
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_array_equal(hl.linear_forward(x, h2), hl.linear_forward(x, h))
    # a table layout whose type has no table (Q4_0) is none a packer makes
    with pytest.raises(KernelError, match="no packer makes"):
        native_call(_native.adopt_packed, [{**layouts[0], "source_type": int(gguf.GGMLQuantizationType.Q4_0)}],
                    buffers, digests, 0, 4096)


def test_expert_set_round_trip_and_view_is_read_only(store):
    rng = np.random.default_rng(2)
    gate, up = (rng.standard_normal((3, 32, 64)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((3, 64, 32)).astype(np.float32)
    h = hm.pack_experts_float(gate, up, down, "int8")
    store.append(h)
    layouts, buffers, digests = _export(h)
    assert len(layouts) == 9
    h2 = native_call(_native.adopt_packed, layouts, buffers, digests, 0, 4096)
    store.append(h2)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    ids = np.array([[0, 2], [1, 0], [2, 1], [0, 1]], np.int32)
    wts = np.full((4, 2), 0.5, np.float32)
    np.testing.assert_array_equal(hm.moe_forward(x, ids, wts, h2), hm.moe_forward(x, ids, wts, h))
    with pytest.raises(ValueError):
        _native.packed_bytes(h, 0)[0] = 1


def test_bad_inputs_are_refused(store):
    h = hl.pack_float_weight(np.ones((16, 64), np.float32), "int8")
    store.append(h)
    layouts, buffers, digests = _export(h)
    adopt = lambda *a: native_call(_native.adopt_packed, *a)  # noqa: E731
    with pytest.raises(KernelError, match="bytes given"):
        adopt(layouts, [buffers[0][:-64]], digests, 0, 4096)
    bad = buffers[0].copy()
    bad[7] ^= 1
    with pytest.raises(KernelError, match="digest"):
        adopt(layouts, [bad], digests, 0, 4096)
    for field, value in (("kind", 7), ("group", 64), ("hi_bits", 2), ("scale_enc", 3)):
        with pytest.raises(KernelError, match="no packer makes"):
            adopt([{**layouts[0], field: value}], buffers, digests, 0, 4096)
    with pytest.raises(KernelError, match="3 per expert"):
        adopt(layouts * 2, buffers * 2, digests * 2, 0, 4096)
    with pytest.raises(KernelError, match="is taken"):
        adopt(layouts, buffers, digests, h, 4096)
    with pytest.raises(KernelError, match="lacks the field"):
        adopt([{k: v for k, v in layouts[0].items() if k != "n"}], buffers, digests, 0, 4096)


def _params_file(tmp_path, store):
    import jax
    import jax.numpy as jnp

    from ktjax.export import packed_weights
    from ktjax.weights import HostWeight
    h = hl.pack_float_weight(np.random.default_rng(3).standard_normal((32, 64)), "int4")
    store.append(h)
    params = {"norm": jnp.arange(8, dtype=jnp.float32),
              "layers": {"w": HostWeight(handles=(h,), out_features=32)}}
    path = tmp_path / "w.ktw"
    packed_weights.write(path, params)
    return path, jax.devices()[0]


def _header(path):
    import json
    import struct
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16:16 + n]), data, n


def _rewrite(path, header, data, n):
    import json
    import struct
    from ktjax.export.packed_weights import ALIGN
    text = json.dumps(header).encode()
    start = -(-(16 + n) // ALIGN) * ALIGN    # where the sections begin
    assert 16 + len(text) <= start            # the header still fits before them
    head = data[:8] + struct.pack("<Q", len(text)) + text
    path.write_bytes(head + bytes(start - len(head)) + data[start:])


def test_params_file_round_trip_under_fresh_handles(tmp_path, store):
    from ktjax.export import packed_weights
    path, device = _params_file(tmp_path, store)
    params = packed_weights.read(path, device, handles="fresh")
    w = params["layers"]["w"]
    store.extend(w.handles)
    np.testing.assert_array_equal(np.asarray(params["norm"]), np.arange(8, dtype=np.float32))
    assert w.out_features == 32


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["sections"].pop(), "lacks"),
    (lambda h: h["sections"][0].__setitem__("size", 10 ** 12), "truncated"),
    (lambda h: h["sections"][0].__setitem__("offset", -4096), "truncated"),
    (lambda h: h["tree"]["dict"].__setitem__("x", {"bogus": 1}), "unknown params node kind"),
    (lambda h: h["tree"]["dict"]["norm"]["array"].__setitem__("shape", [9]), "has 32 bytes"),
    (lambda h: h["tree"]["dict"]["norm"]["array"].__setitem__("dtype", "object"), "dtype"),
    (lambda h: h["tree"]["dict"]["layers"]["dict"]["w"]["host_weight"]["mats"][0][0]
     .__setitem__("n", 64), "bytes given"),
    (lambda h: h.__setitem__("chunk", 7), "hash chunk"),
])
def test_crafted_params_headers_are_refused(tmp_path, store, edit, message):
    from ktjax.errors import ArtifactError
    from ktjax.export import packed_weights
    path, device = _params_file(tmp_path, store)
    header, data, n = _header(path)
    edit(header)
    _rewrite(path, header, data, n)
    before = _native.store_size()
    with pytest.raises(ArtifactError, match=message):
        packed_weights.read(path, device, handles="fresh")
    assert _native.store_size() == before   # nothing adopted stays behind


def test_not_a_params_file(tmp_path):
    from ktjax.errors import ArtifactError
    from ktjax.export import packed_weights
    import jax
    bad = tmp_path / "x.ktw"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ArtifactError, match="bad magic"):
        packed_weights.read(bad, jax.devices()[0])
    bad.write_bytes(b"KTJAXPW1" + (10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="truncated"):
        packed_weights.read(bad, jax.devices()[0])


def test_expert_sets_keep_their_activation_and_biases(tmp_path, store):
    """gpt-oss's expert sets: the stored clamped SwiGLU and biases travel with the packed
    matrices (the programs would otherwise run the sets without them); a bias of the wrong
    shape in a crafted header is refused."""
    import jax

    from ktjax.errors import ArtifactError
    from ktjax.expert_activation import ExpertActivation
    from ktjax.export import packed_weights
    from ktjax.host import moe as hm
    from ktjax.weights import HostExperts
    rng = np.random.default_rng(4)
    E, H, I = 3, 64, 32
    mats = [rng.standard_normal(s).astype(np.float32) for s in [(E, I, H), (E, I, H), (E, H, I)]]
    biases = (rng.standard_normal((E, I)).astype(np.float32), None,
              rng.standard_normal((E, H)).astype(np.float32))
    h = hm.pack_experts_float(*mats, "int4", ExpertActivation("swiglu_oai", 1.702, 7.0), biases)
    plain = hm.pack_experts_float(*mats, "int4")
    store.extend([h, plain])
    path = tmp_path / "e.ktw"
    packed_weights.write(path, {"layers": {"ffn_exps": HostExperts(handles=(h, plain))}})
    back = packed_weights.read(path, jax.devices()[0], handles="fresh")["layers"]["ffn_exps"]
    store.extend(back.handles)
    x = rng.standard_normal((4, H)).astype(np.float32)
    ids, wts = np.array([[0, 2]] * 4, np.int32), np.full((4, 2), 0.5, np.float32)
    for a, b in zip((h, plain), back.handles):
        np.testing.assert_array_equal(hm.moe_forward(x, ids, wts, a), hm.moe_forward(x, ids, wts, b))
    assert hm.stored_epilogue(back.handles[1]) is None
    ep = hm.stored_epilogue(back.handles[0])
    assert ep["activation"] == "swiglu_oai" and ep["up_bias"] is None
    np.testing.assert_array_equal(ep["down_bias"], biases[2])

    header, data, n = _header(path)
    node = header["tree"]["dict"]["layers"]["dict"]["ffn_exps"]["host_experts"]
    node["epilogues"][0]["gate_bias"]["shape"] = [E * I, 1]
    _rewrite(path, header, data, n)
    before = _native.store_size()
    with pytest.raises(ArtifactError, match=r"gate_bias must be float32 \[3, 32\]"):
        packed_weights.read(path, jax.devices()[0], handles="fresh")
    assert _native.store_size() == before

"""ktjax.gguf.ggml_types copies the gguf package's constants (importing gguf is slow): they
must agree with the installed package wherever both name a type."""
import gguf

from ktjax.gguf import ggml_types


def test_value_types_match_gguf():
    assert {t.name: int(t) for t in ggml_types.GGUFValueType} == \
        {t.name: int(t) for t in gguf.GGUFValueType}


def test_tensor_types_and_block_sizes_match_gguf():
    ours = {t.name: t for t in ggml_types.GGMLQuantizationType}
    theirs = {t.name: t for t in gguf.GGMLQuantizationType}
    shared = ours.keys() & theirs.keys()
    assert len(shared) >= 30   # gguf 0.10 already has all but the newest few
    for name in shared:
        assert int(ours[name]) == int(theirs[name]), name
        assert ggml_types.GGML_QUANT_SIZES[ours[name]] == \
            tuple(gguf.GGML_QUANT_SIZES[theirs[name]]), name

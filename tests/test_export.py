"""Export of compiled programs and packed weights (ktjax.export): a warm start from them gives
the tokens a cold load gives with no compile; stale, foreign, corrupt and incomplete artifacts
are refused, recompiled with a warning, or completed on demand; the persistent compilation
cache survives a move; precompile leaves nothing to compile mid-stream."""
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ktjax
from ktjax import SamplingParams
from ktjax.errors import ArtifactError, ArtifactMismatchError

MAX_LEN = 32
PROMPT = [1, 5, 9, 14, 3]
GREEDY = SamplingParams(max_tokens=12, temperature=0)   # 5 + 12 tokens: decode crosses pages
_TREE = str(Path(ktjax.__file__).resolve().parents[1])  # the ktjax these tests import


def _python(code: str, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter importing this ktjax; its stdout. The cwd is _TREE:
    `python -c` puts the cwd first on sys.path, and a checkout without a built module there
    would shadow the installed ktjax."""
    env = {**os.environ, "PYTHONPATH": _TREE, "KTJAX_NO_PROGRESS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600, cwd=_TREE)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny quantized llama: CPU rules put its matrices in the host kernels (packed)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import T, write_tiny_gguf
    return str(write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny-q8.gguf", "llama", T.Q8_0,
                               context_length=128))


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    """`ktjax export` in its own process: greedy programs of a 32-token context."""
    out = tmp_path_factory.mktemp("art") / "a"
    _python(f"from ktjax.cli import main; raise SystemExit(main(['export', {model!r}, '-o', "
            f"{str(out)!r}, '--max-model-len', '{MAX_LEN}', '--kinds', 'greedy']))")
    return out


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens of a cold load (programs compiled in this process)."""
    llm = ktjax.LLM(model, max_model_len=MAX_LEN)
    tokens = llm.generate(PROMPT, GREEDY)[0].token_ids
    del llm
    gc.collect()
    return tokens


def _copy(artifacts, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifacts, dst)
    return dst


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_manifest_records_identity_and_every_reachable_program(artifacts):
    m = json.loads((artifacts / "manifest.json").read_text())
    assert m["engine"]["max_model_len"] == MAX_LEN
    assert m["machine"]["platform"] == "cpu" and m["software"]["jax"]
    assert {"ktjax_linear_layered", "ktjax_paged_attention"} <= set(m["ffi_targets"])
    # prefill of 16 and 32 tokens and decode, 2 pages of 16 (prompts fit one chunk: every
    # prefill step samples)
    assert sorted(m["programs"]) == [
        "step-D0x1-C1x16-P2-greedy", "step-D0x1-C1x32-P2-greedy",
        "step-D1x1-C0x0-P2-greedy"]
    for name, entry in m["programs"].items():
        assert (artifacts / entry["file"]).stat().st_size == entry["size"] > 0


# Modules a start from artifacts does without (docs/kernel-notes.md, "Start-up from
# artifacts"): flax, the MoE-only hybrid_experts, chat templates, the gguf package, the
# compile bar, Pallas.
_SLOW_IMPORTS = ("flax", "jinja2", "gguf", "tqdm", "ktjax.hybrid_experts", "jax._src.pallas")


def test_reload_in_a_new_process_gives_the_same_tokens_without_compiling(artifacts, model,
                                                                         reference):
    out = _python(f"""
import json, jax
from ktjax import LLM, SamplingParams
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, s, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None)
llm = LLM({model!r}, artifacts={str(artifacts)!r})
at_load = len(compiles)
tokens = llm.generate({PROMPT}, SamplingParams(max_tokens=12, temperature=0))[0].token_ids
import sys
print(json.dumps({{"tokens": tokens, "compiles_at_load": at_load,
                   "compiles": len(compiles) - at_load,
                   "programs_compiled": llm.engine.programs.compiles,
                   "loaded": llm.artifacts.loaded,
                   "slow_imports": [m for m in {_SLOW_IMPORTS!r} if m in sys.modules]}}))
""")
    got = json.loads(out.strip().splitlines()[-1])
    assert got["tokens"] == reference
    assert got["compiles_at_load"] == 0   # not even the KV cache's zero fill
    assert got["compiles"] == 0 and got["programs_compiled"] == 0   # not even a cache lookup
    assert "step-D1x1-C0x0-P2-greedy" in got["loaded"]
    assert got["slow_imports"] == []


@pytest.mark.parametrize("section,field,value", [
    ("model", "size", 1),
    ("model", "header_sha256", "0" * 64),
    ("placement", "rules_sha256", "0" * 64),
    ("placement", "decisions_sha256", "0" * 64),
    ("software", "jax", "0.0.1"),
    ("software", "jaxlib", "0.0.1"),
    ("software", "ktjax", "0.0.1"),
    ("software", "native_sha256", "0" * 64),
    ("machine", "platform", "tpu"),
    ("machine", "device_kind", "TPU v9"),
    ("machine", "cpu_features", ["avx512f", "amx_tile", "made_up_feature"]),
])
def test_foreign_artifacts_are_refused_naming_the_field(artifacts, model, tmp_path, section,
                                                        field, value):
    folder = _copy(artifacts, tmp_path)
    _edit_manifest(folder, lambda m: m[section].__setitem__(field, value))
    with pytest.raises(ArtifactMismatchError, match=rf"{section}\.{field}"):
        ktjax.LLM(model, artifacts=folder)


def test_other_engine_settings_or_rules_are_refused(artifacts, model):
    with pytest.raises(ArtifactMismatchError, match=r"engine\.max_model_len: artifacts 32, here 64"):
        ktjax.LLM(model, artifacts=artifacts, max_model_len=64)
    with pytest.raises(ArtifactMismatchError, match=r"placement\.rules_file"):
        ktjax.LLM(model, artifacts=artifacts, rules="device")


def test_programs_for_other_shapes_are_refused(artifacts, model, tmp_path):
    """A manifest edited to other engine settings passes the identity check (its settings
    are this load's defaults) but not the programs' argument check."""
    folder = _copy(artifacts, tmp_path)
    _edit_manifest(folder, lambda m: m["engine"].__setitem__("kv_cache_tokens", 64))
    llm = ktjax.LLM(model, artifacts=folder)
    with pytest.raises(ArtifactError, match="other argument shapes"):
        llm.generate(PROMPT, GREEDY)
    del llm
    gc.collect()


def test_another_model_is_refused(artifacts, tmp_path):
    from tiny_models import T, write_tiny_gguf
    other = write_tiny_gguf(tmp_path / "other.gguf", "llama", T.Q8_0, context_length=128, seed=1)
    with pytest.raises(ArtifactMismatchError, match=r"model\.data_samples_sha256"):
        ktjax.LLM(str(other), artifacts=artifacts)


def test_fallback_compile_warns_and_generates(artifacts, model, tmp_path, reference):
    folder = _copy(artifacts, tmp_path)
    _edit_manifest(folder, lambda m: m["software"].__setitem__("jax", "0.0.1"))
    with pytest.warns(UserWarning, match=r"software\.jax.*compiling instead"):
        llm = ktjax.LLM(model, artifacts=folder, fallback="compile", max_model_len=MAX_LEN)
    assert llm.generate(PROMPT, GREEDY)[0].token_ids == reference
    assert llm.artifacts is None
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ktjax.LLM(model, artifacts=folder)
    with pytest.warns(UserWarning, match="not valid JSON"):
        ktjax.LLM(model, artifacts=folder, fallback="compile", max_model_len=MAX_LEN)


def test_truncated_or_corrupt_weights_are_refused(artifacts, model, tmp_path):
    folder = _copy(artifacts, tmp_path)
    weights = folder / "weights.ktw"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        ktjax.LLM(model, artifacts=folder)
    # one byte of the last section (packed weights or arrays) flipped, size unchanged
    data[-5] ^= 0xFF
    weights.write_bytes(data)
    with pytest.raises(ArtifactError, match="digest"):
        ktjax.LLM(model, artifacts=folder)
    # the weights adopted before the bad section were released: their handles are free again
    llm = ktjax.LLM(model, artifacts=artifacts)
    del llm
    gc.collect()


def test_corrupt_tokenizer_is_refused(artifacts, model, tmp_path):
    folder = _copy(artifacts, tmp_path)
    path = folder / "tokenizer.json"
    text = path.read_text()
    assert '"a"' in text
    path.write_text(text.replace('"a"', '"b"', 1))   # same size, other content
    with pytest.raises(ArtifactError, match="tokenizer.json: its SHA-256"):
        ktjax.LLM(model, artifacts=folder)


def test_truncated_or_corrupt_program_is_refused(artifacts, model, tmp_path):
    folder = _copy(artifacts, tmp_path)
    program = folder / "programs" / "step-D1x1-C0x0-P2-greedy.xla"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(data)
    llm = ktjax.LLM(model, artifacts=folder)
    with pytest.raises(ArtifactError, match="SHA-256"):
        llm.generate(PROMPT, GREEDY)
    program.write_bytes(data[:100])
    llm.engine.programs.source = None   # the engine stays usable: compile this one instead
    assert len(llm.generate(PROMPT, GREEDY)[0].token_ids) == GREEDY.max_tokens
    del llm
    gc.collect()


def test_missing_program_compiles_on_demand_and_says_so(artifacts, model, tmp_path, reference,
                                                        caplog):
    folder = _copy(artifacts, tmp_path)
    name = "step-D1x1-C0x0-P2-greedy"
    (folder / "programs" / f"{name}.xla").unlink()
    _edit_manifest(folder, lambda m: m["programs"].pop(name))
    llm = ktjax.LLM(model, artifacts=folder)
    with caplog.at_level(logging.WARNING, logger="ktjax.export"):
        assert llm.generate(PROMPT, GREEDY)[0].token_ids == reference
    assert f"no program {name} in the artifacts; compiling it" in caplog.text
    assert llm.engine.programs.compiles == 1 and llm.artifacts.compiled == [name]
    del llm
    gc.collect()


def test_precompile_leaves_nothing_to_compile_mid_stream(model):
    from ktjax.export.program_set import ProgramSpec
    llm = ktjax.LLM(model, max_model_len=MAX_LEN, precompile=ProgramSpec(kinds=("greedy",)))
    before = llm.engine.programs.compiles
    assert before == 3
    for prompt in ([3], PROMPT, list(range(1, 25))):   # prefill of 16 and 32, decode to the end
        llm.generate(prompt, SamplingParams(max_tokens=MAX_LEN - len(prompt) - 1,
                                            temperature=0, ignore_eos=True))
    assert llm.engine.programs.compiles == before


def test_persistent_cache_hits_after_a_move_to_another_folder_and_home(tmp_path):
    code = """
import sys, jax, jax.numpy as jnp
from ktjax.engine.programs import enable_persistent_cache
enable_persistent_cache(sys.argv[1])
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
jax.jit(lambda x: jnp.sin(x) * 2 + 1).lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
print(len(hits))
"""
    first, moved = tmp_path / "home1" / "xla", tmp_path / "elsewhere" / "xla"

    def run(cache, home):
        env = {**os.environ, "PYTHONPATH": _TREE, "HOME": str(home)}
        r = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True,
                           text=True, env=env, timeout=300, cwd=_TREE)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    assert run(first, tmp_path / "home1") == 0
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    assert run(moved, tmp_path / "home2") == 1


def test_hybrid_moe_with_quantized_device_matrices_round_trips(tmp_path):
    """A GPU program's params on CPU: routed experts split between a device pool and host
    sets (HybridExperts, from the rules' `experts:` section) and int8 device matrices
    (QuantMatrix). Exported and reloaded in new processes, they give a cold load's tokens."""
    from ktjax.rules import rules_path
    from tiny_models import write_tiny_gguf
    moe = str(write_tiny_gguf(tmp_path / "moe.gguf", "qwen3moe", n_experts=8, n_used=2,
                              n_layers=2, context_length=128))
    rules = tmp_path / "r.yaml"
    rules.write_text(rules_path("qwen3moe").read_text().replace(
        "  - name: everything else", "  - name: attention matrices\n"
        "    match: blk\\.\\d+\\.attn_(q|k|v|output)\\.weight\n"
        "    placement: device\n    format: int8\n  - name: everything else") +
        "experts: {n_cpu_moe: 1, hot: {1: [0, 3]}}\n")
    llm = ktjax.LLM(moe, rules=str(rules), max_model_len=MAX_LEN)
    params = llm.engine.params
    assert type(params["layers"]["ffn_exps"]).__name__ == "HybridExperts"
    assert any(type(v).__name__ == "QuantMatrix" for v in params["layers"].values())
    cold = llm.generate(PROMPT, GREEDY)[0].token_ids
    del llm, params
    gc.collect()
    out = tmp_path / "art"
    _python(f"from ktjax.cli import main; raise SystemExit(main(['export', {moe!r}, '-o', "
            f"{str(out)!r}, '--rules', {str(rules)!r}, '--max-model-len', '{MAX_LEN}', "
            f"'--kinds', 'greedy']))")
    warm = _python(f"""
from ktjax import LLM, SamplingParams
llm = LLM({moe!r}, rules={str(rules)!r}, artifacts={str(out)!r})
print(llm.generate({PROMPT}, SamplingParams(max_tokens=12, temperature=0))[0].token_ids,
      llm.engine.programs.compiles)
""")
    assert warm.strip().splitlines()[-1] == f"{cold} 0"

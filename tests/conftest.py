import os

import jax
import pytest
from isa_levels import ISAS

os.environ.setdefault("KTJAX_NO_PROGRESS", "1")
# float32 comparisons against references mean full-precision matmuls (GPUs default to TF32).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from tiny_models import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", "llama",
                           context_length=2048)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_path):
    from ktjax import LLM
    return LLM(str(tiny_llama_path), max_model_len=1024, kv_cache_tokens=4096,
               host_linears=False, dtype="float32")  # dense XLA: exact against the reference forward


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per ISA level this machine has, with the kernels forced to it."""
    from ktjax import _native
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa("")


@pytest.fixture
def store():
    """Native weight-store handles a test creates, released afterwards."""
    from ktjax.host import linear as hl
    handles: list[int] = []
    yield handles
    for h in handles:
        hl.release(h)

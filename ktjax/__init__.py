"""ktjax: GGUF language models as ahead-of-time compiled JAX programs."""
from ktjax.errors import KtjaxError
from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "KtjaxError"]


def __getattr__(name: str):
    # LLM pulls in jax and the engine; importing ktjax.gguf.* alone stays light.
    if name == "LLM":
        from ktjax.api import LLM
        return LLM
    raise AttributeError(f"module 'ktjax' has no attribute {name!r}")

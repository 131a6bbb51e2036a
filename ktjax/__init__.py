"""ktjax: GGUF language models as ahead-of-time compiled JAX programs."""
from ktjax.engine import xla_flags as _xla_flags

_xla_flags.apply()  # before anything starts jax's backend: XLA reads its flags once

from ktjax.errors import KtjaxError
from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams

__version__ = "0.1.0"   # as pyproject.toml

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "KtjaxError"]


def __getattr__(name: str):
    # LLM and EngineConfig pull in jax; importing ktjax.gguf.* alone stays light.
    if name == "LLM":
        from ktjax.api import LLM
        return LLM
    if name == "EngineConfig":
        from ktjax.engine.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'ktjax' has no attribute {name!r}")

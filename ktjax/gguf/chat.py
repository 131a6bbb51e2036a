"""Chat prompts: the model's Jinja chat template rendered in a sandbox, as HF transformers does.

Templates come from model files and are untrusted, so they run in jinja2's immutable sandbox
with only the helpers HF provides (``raise_exception``, ``strftime_now``, ``tojson``).
Without a template the prompt is ChatML (llama.cpp's fallback), except for Gemma models,
whose turn format is well known and which ship without one (Gemma 3 270M).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ktjax.errors import KtjaxError, RequestError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format; system text goes in a user turn, as Gemma has no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def default_template(architecture: str) -> str:
    """The template for a model file that has none."""
    return GEMMA_TEMPLATE if architecture.startswith("gemma") else CHATML_TEMPLATE


class _TemplateRaised(Exception):
    """raise_exception() called by a template: the messages break the template's rules."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's tojson keeps non-ASCII text as is (jinja's built-in escapes it for HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise KtjaxError(f"chat template does not parse: {e.message} (line {e.lineno})") from e


def check_messages(messages: Any) -> None:
    """Raise RequestError unless ``messages`` is a non-empty list of {role, content} strings."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise RequestError(f"messages[{i}]['{key}'] must be a str, got {m.get(key)!r:.60}")


def render_chat(template: str | None, messages: list[dict], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``; ``template=None`` renders ChatML."""
    check_messages(messages)
    compiled = _compile(CHATML_TEMPLATE if template is None else template)
    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except _TemplateRaised as e:
        raise RequestError(f"chat template rejected the messages: {e}") from e
    except jinja2.exceptions.SecurityError as e:
        raise KtjaxError(f"chat template tried an unsafe operation: {e}") from e
    except Exception as e:  # any other failure inside untrusted template code
        raise KtjaxError(f"chat template failed: {type(e).__name__}: {e}") from e

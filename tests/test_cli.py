"""The `ktjax` command, and the persistent compilation cache across processes."""
import os
import subprocess
import sys


def _ktjax(args, env=None, stdin=None):
    # cwd outside the checkout: `python -m` must import the installed ktjax, not the sources
    return subprocess.run([sys.executable, "-m", "ktjax.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, input=stdin,
                          timeout=600, cwd=os.path.expanduser("~"))


def test_generate_streams_and_second_process_reuses_compiled_programs(tiny_llama_path,
                                                                      tmp_path):
    env = {"KTJAX_CACHE_DIR": str(tmp_path / "xla")}
    args = ["generate", "hello", "--model", str(tiny_llama_path), "--max-tokens", "5",
            "--temperature", "0"]
    first = _ktjax(args, env)
    assert first.returncode == 0, first.stderr
    entries = sorted(os.listdir(tmp_path / "xla"))
    assert entries                                   # the first process wrote executables
    second = _ktjax(args, env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(os.listdir(tmp_path / "xla")) == entries   # all hits: nothing recompiled


def test_chat_replies_to_each_line_with_the_history(tiny_llama_path):
    """Each stdin line is a user turn; what is printed is the model's greedy reply to the chat
    so far (the second turn sees the first and its reply), and /exit ends the session."""
    from ktjax import LLM, SamplingParams

    r = _ktjax(["chat", "--model", str(tiny_llama_path), "--max-tokens", "4",
                "--temperature", "0"], stdin="hi\nagain\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    llm = LLM(str(tiny_llama_path))   # the CLI's defaults
    params = SamplingParams(max_tokens=4, temperature=0)
    history = [{"role": "user", "content": "hi"}]
    first = llm.chat(history, params)
    history += [{"role": "assistant", "content": first.text},
                {"role": "user", "content": "again"}]
    second = llm.chat(history, params)
    assert len(first.token_ids) == len(second.token_ids) == 4   # no EOS: a real reply each
    assert r.stdout == f"{first.text}\n{second.text}\n"


def test_info_and_errors(tiny_llama_path, tmp_path):
    r = _ktjax(["info", str(tiny_llama_path)])
    assert r.returncode == 0 and "architecture  llama" in r.stdout and "F32" in r.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = _ktjax(["info", str(bad)])
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = _ktjax(["generate", "x", "--model", str(tiny_llama_path), "--top-p", "0"])
    assert r.returncode == 2 and "top_p" in r.stderr

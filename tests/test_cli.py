"""The `ktjax` command, and the persistent compilation cache across processes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ktjax import SamplingParams, __version__
from ktjax import cli, progress
from ktjax.rules import profiles

SAMPLE = Path(__file__).parent / "data" / "choices_sample.jsonl"


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
    assert "ktjax: loading tiny-llama.gguf" in first.stderr and "loaded in" in first.stderr
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
                "--temperature", "0", "--chat-template", "chatml"],
               stdin="hi\nagain\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert "/exit" in r.stderr
    llm = LLM(str(tiny_llama_path))   # the CLI's defaults; ChatML is the API's fallback
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
    assert "chat template none" in r.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = _ktjax(["info", str(bad)])
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = _ktjax(["generate", "x", "--model", str(tiny_llama_path), "--top-p", "0"])
    assert r.returncode == 2 and "top_p" in r.stderr


def _run(capsys, *args):
    """main() in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:      # --help, --version
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_the_prompt_and_every_sampling_flag_with_its_default(capsys):
    code, out, _ = _run(capsys, "generate", "--help")
    assert code == 0 and re.search(r"PROMPT\s+the text to continue", out)
    text = " ".join(out.split())                  # argparse wraps lines
    text = text[text.index("sampling (defaults"):]
    for name, value in cli.CLI_SAMPLING.items():
        flag = "--" + name.replace("_", "-")
        m = re.search(re.escape(flag) + r" \S+(?:, -\w \S+)? (.*?)\(default: ([^)]*)\)", text)
        assert m and m[1].strip(), f"{flag} has no help text: {text}"
        assert float(m[2]) == value, flag
    assert "--seed SEED seed" in text and "(default: random)" in text
    SamplingParams(**cli.CLI_SAMPLING)           # the defaults are valid
    code, out, _ = _run(capsys, "--help")
    for command in ("generate", "chat", "batch", "eval", "info", "models", "rules"):
        assert re.search(rf"^    {command} +\S", out, re.M), command
    assert "/exit" in out


def test_version_models_and_rule_profiles(capsys):
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith(f"ktjax {__version__} (jax ")
    code, out, _ = _run(capsys, "models")
    assert code == 0
    for name in ("smollm2-135m", "gemma3-270m"):
        assert re.search(rf"^{name} +\S", out, re.M)
    code, out, _ = _run(capsys, "rules")
    names = [name for name, _ in profiles()]
    assert code == 0 and "cpu" in names and "device" in names
    for name in names:
        assert re.search(rf"^{name} +\S", out, re.M)


def test_chat_over_a_model_without_a_template_is_refused_before_loading(capsys,
                                                                       tiny_llama_path):
    code, out, err = _run(capsys, "generate", "hi", "--chat", "--model", str(tiny_llama_path))
    assert code == 2 and "has no chat template" in err and "--chat-template" in err
    assert "loading" not in err and out == ""
    code, _, err = _run(capsys, "chat", "--model", str(tiny_llama_path), "--chat-template",
                        "/nonexistent/template.jinja")
    assert code == 2 and "cannot read the chat template" in err


def test_compile_bars_wait_while_a_streamed_line_is_open(tiny_llm, monkeypatch, capsys):
    """A compile that starts while streamed text holds the terminal line draws no bar (it
    would redraw and erase that line); at the start of a line it draws one."""
    from ktjax.engine import buckets as bk
    from ktjax.engine import programs
    monkeypatch.delenv("KTJAX_NO_PROGRESS", raising=False)
    drawn = []
    real_tqdm = programs.tqdm
    monkeypatch.setattr(programs, "tqdm", lambda *a, **k: (drawn.append(not k["disable"]),
                                                           real_tqdm(*a, **k))[1])
    writer = progress.StreamWriter(shares_terminal=True)
    writer.write("streamed text, no newline yet")
    tiny_llm.engine.programs.compile([(bk.Bucket(3, 1, 8), None)])
    writer.write(" and the end of the line\n")
    tiny_llm.engine.programs.compile([(bk.Bucket(5, 1, 8), None)])
    assert drawn == [False, True]
    writer.write("> ")
    writer.at_line_start()                       # the user pressed Enter
    assert progress.bars_enabled()
    redirected = progress.StreamWriter(shares_terminal=False)   # stdout is a file: no line
    redirected.write("text")
    assert progress.bars_enabled()
    capsys.readouterr()


def test_batch_and_eval_commands(capsys, tiny_llama_path, tmp_path):
    model = ["--model", str(tiny_llama_path), "-q"]
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": "x", "prompt": "hello"}\n{"messages": []}\n')
    out = tmp_path / "out.jsonl"
    code, stdout, err = _run(capsys, "batch", str(requests), "-o", str(out), "-n", "3", *model)
    assert code == 0, err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["id"] == "x" and lines[0]["completion_tokens"] == 3
    assert lines[1]["id"] == 2 and "no chat template" in lines[1]["error"]
    assert "2 result(s) written" in stdout and "1 error(s)" in stdout
    code, stdout, err = _run(capsys, "eval", "choices", str(SAMPLE), "--limit", "4",
                             "-o", str(tmp_path / "items.jsonl"), *model)
    assert code == 0, err
    assert re.search(r"^acc +[\d.]+ ± [\d.]+$", stdout, re.M) and "4 items, 16 continuations" \
        in stdout
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 4
    text = tmp_path / "text.txt"
    text.write_text("a few words of text to score " * 20)
    code, stdout, err = _run(capsys, "eval", "perplexity", str(text), "--ctx", "64", *model)
    assert code == 0, err
    assert re.search(r"^PPL = [\d.]+$", stdout, re.M) and "[1] " in stdout
    code, _, err = _run(capsys, "eval", "choices", str(tmp_path / "none.jsonl"), *model)
    assert code == 2 and "no such file" in err


def test_compile_bar_never_draws_over_streamed_text_on_a_terminal(tiny_llama_path, tmp_path):
    """stdout and stderr on one pseudo-terminal, as in a shell: 200 tokens pass the
    128-token context bucket, so a decode program compiles mid-stream. Each line of the
    streamed text arrives whole (no bar frame inside it), and a bar was drawn before it."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    from ktjax import LLM
    params = SamplingParams(**{**cli.CLI_SAMPLING, "max_tokens": 200, "temperature": 0})
    llm = LLM(str(tiny_llama_path))                 # the command's configuration
    out = llm.generate("hello", params)[0]
    expected = out.text
    assert len(out.prompt_token_ids) + len(out.token_ids) > 128

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "KTJAX_NO_PROGRESS"}
    env["KTJAX_CACHE_DIR"] = str(tmp_path / "xla")      # compiles happen: bars are drawn
    proc = subprocess.Popen([sys.executable, "-m", "ktjax.cli", "generate", "hello",
                             "--model", str(tiny_llama_path), "-n", "200", "-t", "0"],
                            stdout=child_fd, stderr=child_fd, stdin=subprocess.DEVNULL,
                            env=env, cwd=os.path.expanduser("~"))
    os.close(child_fd)
    data = b""
    while True:
        ready, _, _ = select.select([main_fd], [], [], 600)
        try:
            chunk = os.read(main_fd, 65536) if ready else b""
        except OSError:                                  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        data += chunk
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0, data[-2000:]
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")   # the terminal's newlines
    lines = expected.split("\n")
    assert lines[0] in text, f"a bar broke the streamed line: {text!r:.3000}"
    start = text.index(lines[0])
    assert "compiling:" in text[:start]
    for line in lines[1:]:
        assert line in text[start:], f"a bar broke the streamed line: {text[start:]!r:.3000}"


def test_engine_options_reach_the_engine_config(tiny_llama_path, monkeypatch):
    from ktjax.errors import KtjaxError
    seen = []

    def capture(self, model, config=None, **fields):  # the settings the CLI gave, no load
        seen.append(fields)
        raise KtjaxError("stop after the settings")
    monkeypatch.setattr("ktjax.api.LLM.__init__", capture)
    assert cli.main(["generate", "hi", "-m", str(tiny_llama_path), "--speculative", "ngram",
                     "--spec-tokens", "2", "--max-step-tokens", "256",
                     "--no-prefix-caching"]) == 2
    assert {k: seen[0][k] for k in ("speculative", "spec_tokens", "max_step_tokens",
                                    "prefix_caching")} == {
        "speculative": "ngram", "spec_tokens": 2, "max_step_tokens": 256,
        "prefix_caching": False}
    assert cli.main(["generate", "hi", "-m", str(tiny_llama_path)]) == 2
    assert not {"speculative", "spec_tokens", "max_step_tokens", "prefix_caching"} & \
        set(seen[1])

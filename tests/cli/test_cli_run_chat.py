"""`herd run` and `herd chat` end to end on a tiny real-vocabulary checkpoint."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from herd.cli.main import main

TIMING = re.compile(r"prompt \d+ tok, [\d.]+ tok/s \| generated \d+ tok, [\d.]+ tok/s")


@pytest.fixture(scope="module")
def llm(real_vocab_dir):
    import herd

    return herd.load(real_vocab_dir)


@pytest.fixture
def cached_load(monkeypatch, llm):
    """Load the model once for all in-process CLI calls."""
    import herd

    monkeypatch.setattr(herd, "load", lambda source, **kw: llm)
    return llm


def test_run_prints_text_and_timing(real_vocab_dir, cached_load, capsys):
    llm = cached_load
    assert main(["run", "-m", str(real_vocab_dir), "-p", "Tell me a story", "-n", "8", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    ids = llm.format_chat([{"role": "user", "content": "Tell me a story"}])
    expected = llm.complete(ids, max_tokens=8, temperature=0)
    assert out == expected + "\n"
    assert TIMING.search(err), err
    assert llm.last_stats.generated_tokens <= 8


def test_run_no_cnv_echoes_raw_prompt(real_vocab_dir, cached_load, capsys):
    llm = cached_load
    argv = ["run", "-m", str(real_vocab_dir), "-p", "Once upon", "-n", "5", "--temp", "0", "-no-cnv", "--verbose-prompt"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "Once upon" + llm.complete("Once upon", max_tokens=5, temperature=0) + "\n"
    assert f"prompt: {len(llm.tokenizer.encode('Once upon', bos=True))} tokens" in err


def test_run_prompt_file_and_system_prompt(tmp_path, real_vocab_dir, cached_load, capsys):
    f = tmp_path / "p.txt"
    f.write_text("Hello from a file", encoding="utf-8")
    argv = ["run", "-m", str(real_vocab_dir), "-f", str(f), "-sys", "Be brief.", "-n", "3", "--temp", "0", "--seed", "1"]
    assert main(argv) == 0
    assert cached_load.last_stats.prompt_tokens == len(
        cached_load.format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello from a file"}])
    )


def test_run_errors_are_one_line(real_vocab_dir, cached_load, capsys):
    assert main(["run", "-m", str(real_vocab_dir), "-p", "hi", "-n", "50", "-c", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("herd: error:") and err.count("\n") == 1 and "context" in err
    assert main(["run", "-m", str(real_vocab_dir), "-p", "hi", "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err
    assert main(["run", "-m", str(real_vocab_dir), "-f", "/nonexistent/prompt.txt"]) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["run", "-m", str(real_vocab_dir)])  # -p or -f is required
    assert exit_.value.code == 2


def test_chat_script_in_process(real_vocab_dir, cached_load, monkeypatch, capsys):
    llm = cached_load
    seen = []
    real = llm.format_chat
    monkeypatch.setattr(llm, "format_chat", lambda messages, **kw: seen.append([dict(m) for m in messages]) or real(messages, **kw))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/reset\nhi\n/exit\nnever read\n"))
    assert main(["chat", "-m", str(real_vocab_dir), "-n", "4", "--temp", "0"]) == 0
    err = capsys.readouterr().err
    assert len(TIMING.findall(err)) == 3
    assert [len(m) for m in seen] == [1, 3, 1]  # history kept, then cleared by /reset
    assert seen[1][0] == {"role": "user", "content": "hello"} and seen[1][1]["role"] == "assistant"
    assert seen[2] == [{"role": "user", "content": "hi"}]


def test_chat_ctrl_c_stops_the_answer_not_the_session(real_vocab_dir, cached_load, monkeypatch, capsys):
    llm = cached_load

    def interrupted(ids, **kw):
        def pieces():
            yield "partial"
            raise KeyboardInterrupt

        return pieces()

    monkeypatch.setattr(llm, "generate", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhi\n"))  # then EOF
    assert main(["chat", "-m", str(real_vocab_dir), "-n", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count("partial") == 2 and err.count("[stopped]") == 2


def test_chat_subprocess_stdin_script(real_vocab_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "herd", "chat", "-m", str(real_vocab_dir), "-n", "4", "--temp", "0", "-t", "1"],
        input="hello\n/reset\nhi\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(TIMING.findall(proc.stderr)) == 2


def test_run_compile_flag_gives_the_same_text(real_vocab_dir, llm, capsys):
    """`--compile` attaches the compiled decode step (a fresh load: the cached one stays eager) and the greedy
    text is the eager text."""
    import herd

    argv = ["run", "-m", str(real_vocab_dir), "-p", "Tell me a story", "-n", "6", "--temp", "0", "--compile"]
    loaded = []
    real_load = herd.load

    def load(source, **kw):
        loaded.append(real_load(source, **kw))
        return loaded[-1]

    herd.load = load
    try:
        assert main(argv) == 0
    finally:
        herd.load = real_load
    out, _ = capsys.readouterr()
    assert "_decode_step" in loaded[0].model.__dict__
    ids = llm.format_chat([{"role": "user", "content": "Tell me a story"}])
    assert out == llm.complete(ids, max_tokens=6, temperature=0) + "\n"

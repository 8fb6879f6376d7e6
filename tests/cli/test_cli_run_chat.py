"""`herd run` and a scripted `herd chat` session, end to end through the console script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from builders import random_hf_model, real_vocab_config

    cfg = real_vocab_config()
    path = tmp_path_factory.mktemp("cli")
    random_hf_model(cfg, seed=2, std=0.5).save_pretrained(path)
    return path


def herd_cli(*args, stdin=""):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "herd", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_run_prints_text_and_timing(model_dir):
    import herd

    r = herd_cli("run", "-m", str(model_dir), "-p", "Hello there", "-n", "8", "--temp", "0")
    assert r.returncode == 0, r.stderr
    llm = herd.load(model_dir)
    want = llm.complete(llm.format_chat([{"role": "user", "content": "Hello there"}]), max_tokens=8, temperature=0)
    assert r.stdout == want + "\n"
    n_prompt = len(llm.format_chat([{"role": "user", "content": "Hello there"}]))
    assert f"prompt {n_prompt} tok" in r.stderr and "generated" in r.stderr and "tok/s" in r.stderr


def test_run_raw_completion_and_verbose_prompt(model_dir):
    r = herd_cli("run", "-m", str(model_dir), "-p", "Once upon", "-n", "4", "--temp", "0", "-no-cnv", "--verbose-prompt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon")
    assert "200000 -> b'<|begin_of_text|>'" in r.stderr and "200005" not in r.stderr  # BOS, no chat header


def test_scripted_chat_session(model_dir):
    r = herd_cli("chat", "-m", str(model_dir), "-n", "5", "--seed", "1", stdin="hello\n/reset\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(conversation cleared)" in r.stderr
    assert r.stderr.count("generated") == 2  # two answers, each with its timing line


def test_bad_input_exit_codes(model_dir, tmp_path):
    r = herd_cli("run", "-m", str(tmp_path / "nope"), "-p", "x")
    assert r.returncode == 1 and r.stderr.strip().startswith("herd: error:") and r.stderr.strip().count("\n") == 0
    r = herd_cli("run", "-m", str(model_dir), "-p", "x", "--top-p", "2")
    assert r.returncode == 1 and "top_p" in r.stderr
    assert herd_cli("run", "--bogus").returncode == 2

"""The bundled demo model: Llama 4 architecture with llama.cpp's constants, routed experts holding >= 70%
of the parameters, K-quant-friendly widths, and English out of the box (the README's main job)."""

import re
import subprocess
import sys

import pytest

import herd
from herd.weights.demo import demo_path


@pytest.fixture(scope="module")
def demo():
    return herd.load("demo")


def test_architecture(demo):
    c = demo.config
    assert demo_path().suffix == ".gguf" and demo_path().stat().st_size <= 40 * 2**20
    assert c.num_local_experts == 16 and c.num_experts_per_tok == 1 and c.num_hidden_layers >= 4
    assert c.attention_chunk_size == 8192 and c.floor_scale == 8192 and c.attn_scale == 0.1 and c.use_qk_norm
    assert "full_attention" in c.layer_types  # at least one NoPE layer
    assert c.hidden_size % 256 == 0 and c.intermediate_size % 256 == 0
    counts = c.parameter_counts()
    experts = sum(v for k, v in counts.items() if k == "experts")
    assert experts / sum(counts.values()) >= 0.70


def test_greedy_continuation_is_english(demo):
    text = demo.complete("The capital of France is", max_tokens=32, temperature=0)
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= 10 and re.search(r"[.,;]", text)


def test_chat_answers_in_the_format(demo):
    reply = demo.chat([{"role": "user", "content": "Hello, how are you?"}], max_tokens=24, seed=0)
    assert reply["role"] == "assistant" and re.search(r"[A-Za-z]{3,}", reply["content"])
    assert demo.last_stats.finish_reason in ("stop", "length")


def test_main_job_command(tmp_path):
    """`herd run` without -m uses the bundled model (the README's main job)."""
    r = subprocess.run([sys.executable, "-m", "herd.cli.main", "run", "-p", "The capital of France is", "-n", "16",
                        "--seed", "0", "-no-cnv"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # sampled (Meta's defaults), so it may stop early at an end token: the text's quality is checked greedily above
    assert r.stdout.startswith("The capital of France is") and len(re.findall(r"[A-Za-z]{2,}", r.stdout)) >= 6
    assert re.search(r"generated \d+ tok, [\d.]+ tok/s", r.stderr)

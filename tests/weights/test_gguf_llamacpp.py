"""llama.cpp itself (llama-cpp-python) loads herd's GGUF and computes the same logits and token ids.

Opt-in: `pip install -e ".[llamacpp]"` (builds llama.cpp, ~6 minutes on 2 cores), then `pytest -m llamacpp`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import herd

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    return llama_cpp


def test_llamacpp_logits_match_herd(llama_cpp, gguf_model):
    ours = herd.load(gguf_model[1])
    tokens = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs away.", bos=True)
    ref = llama_cpp.Llama(model_path=str(gguf_model[1]), n_ctx=128, logits_all=True, type_k=0, type_v=0,
                          verbose=False, n_threads=2)
    ref.eval(tokens)
    theirs = np.asarray(ref.scores[: len(tokens)], dtype=np.float32)
    mine = ours.logits(torch.tensor([tokens]))[0].numpy()
    diff = np.abs(theirs - mine).max()
    print(f"max |dlogits| herd vs llama.cpp (F32 GGUF, F32 KV cache): {diff:.2e}")
    assert diff <= 1e-3


def test_llamacpp_tokenizes_like_herd(llama_cpp, gguf_model):
    ours = herd.load(gguf_model[1]).tokenizer
    ref = llama_cpp.Llama(model_path=str(gguf_model[1]), n_ctx=64, vocab_only=True, verbose=False)
    for text in ["Hello world", "日本語 🎉 émoji", "def f(x):\n\treturn x", "It's 12345 o'clock", "  two  spaces"]:
        assert ref.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), text
    assert ref.token_bos() == ours.bos_id

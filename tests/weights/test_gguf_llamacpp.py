"""llama.cpp itself (llama-cpp-python) loads herd's GGUFs and computes the same logits and token ids.

Opt-in: `pip install -e ".[llamacpp]"` (builds llama.cpp, ~6 minutes on 2 cores), then `pytest -m llamacpp`.
Runs with an F32 K/V cache (type_k = type_v = 0) and flash attention off: llama.cpp's default F16 cache
alone moves the logits by ~3e-4.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch

import herd
from herd.quant import kernels

pytestmark = pytest.mark.llamacpp


def _llama_logits(llama_cpp, path, tokens, **kw):
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, verbose=False, n_threads=2, **kw)
    ref.eval(tokens)
    out = np.asarray(ref.scores[: len(tokens)], dtype=np.float32).copy()
    ref.close()
    return out


def test_llamacpp_logits_match_herd(llama_cpp, gguf_model):
    ours = herd.load(gguf_model[1])
    tokens = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs away.", bos=True)
    theirs = _llama_logits(llama_cpp, gguf_model[1], tokens)
    mine = ours.logits(torch.tensor([tokens]))[0].numpy()
    diff = np.abs(theirs - mine).max()
    print(f"max |dlogits| herd vs llama.cpp (F32 GGUF, F32 KV cache, {len(tokens)} tokens): {diff:.2e}")
    assert diff <= 1e-3


def test_llamacpp_reads_rope_freqs_dense_layers_and_q4_k(llama_cpp, small_model, q4k_model):
    """The small model: llama3 rope_freqs, alternating dense/MoE layers; then its Q4_K file."""
    tokens = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = herd.load(small_model[1])
    diff = np.abs(_llama_logits(llama_cpp, small_model[1], tokens) - ours.logits(torch.tensor([tokens]))[0].numpy()).max()
    print(f"small F32 model: max |dlogits| herd vs llama.cpp {diff:.2e}")
    assert diff <= 1e-3
    q = herd.load(q4k_model)
    with kernels.exact():  # the file as decoded exactly: llama.cpp's own activation rounding is the only gap
        mine = q.logits(torch.tensor([tokens]))[0].double()
    theirs = torch.from_numpy(_llama_logits(llama_cpp, q4k_model, tokens)).double()
    p, r = mine.log_softmax(-1), theirs.log_softmax(-1)
    kld = (p.exp() * (p - r)).sum(-1).mean().item()
    print(f"Q4_K file: max |dlogits| herd vs llama.cpp {(mine - theirs).abs().max().item():.2e}, KLD {kld:.2e} "
          "(llama.cpp rounds activations to Q8_K for K-quant matmuls)")
    assert kld < 1e-3


def test_llamacpp_tokenizes_like_herd(llama_cpp, gguf_model):
    from test_gguf import TEXTS

    ours = herd.load(gguf_model[1]).tokenizer
    ref = llama_cpp.Llama(model_path=str(gguf_model[1]), n_ctx=64, vocab_only=True, verbose=False)
    # llama.cpp's "llama4" (gpt-4o) split regex approximates the letter classes without \p{M}, so a
    # combining mark inside a word (Devanagari "नमस्ते") ends the pre-token there; tiktoken and herd keep
    # the word whole. Strings with combining marks are left out of the comparison for that reason.
    compared = [t for t in TEXTS if t and not any(unicodedata.category(c).startswith("M") for c in t)]
    assert len(compared) >= 30
    for text in compared:
        assert ref.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), text
        assert ref.tokenize(text.encode(), add_bos=True, special=False) == ours.encode(text, bos=True), text
    assert ref.tokenize(b"<|header_start|>user<|header_end|>", add_bos=False, special=True)[0] == 200005
    assert (ref.token_bos(), ref.token_eos()) == (ours.bos_id, 200008)
    assert ref.metadata["tokenizer.chat_template"].startswith("{{ bos_token }}")

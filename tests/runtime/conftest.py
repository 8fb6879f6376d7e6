"""Runtime fixtures: one tiny random transformers Llama4ForCausalLM with the real 202,048-token vocabulary
(hidden 32, 2 layers), saved once per session. The directory has no tokenizer files, so herd falls back
to Meta's Llama 4 tokenizer, whose ids all fit the vocabulary."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_vocab_checkpoint(tmp_path_factory):
    """-> (the transformers model, fp32 and in eval mode; the directory it was saved to)."""
    from builders import random_hf_model, real_vocab_config

    hf = random_hf_model(real_vocab_config(), seed=1, std=0.5)
    path = tmp_path_factory.mktemp("real_vocab")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="session")
def real_vocab_llm(real_vocab_checkpoint):
    import herd

    return herd.load(real_vocab_checkpoint[1])

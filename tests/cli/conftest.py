"""CLI fixtures: a tiny random transformers Llama4ForCausalLM with the real 202,048-token vocabulary
(hidden 32, 2 layers) saved once per session; herd falls back to Meta's tokenizer for it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_vocab_dir(tmp_path_factory):
    from builders import random_hf_model, real_vocab_config

    hf = random_hf_model(real_vocab_config(), seed=1, std=0.5)
    path = tmp_path_factory.mktemp("cli_real_vocab")
    hf.save_pretrained(path)
    return path

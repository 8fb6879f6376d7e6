from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """A tiny random Llama 4 with llama.cpp's constants (chunk 8192, floor 8192, scale 0.1, NoPE every 4th),
    the real vocabulary, saved as an HF checkpoint and converted to an F32 GGUF with `herd convert`."""
    from builders import random_hf_model, tiny_text_config

    from herd.cli.main import main

    cfg = tiny_text_config(vocab_size=202048, hidden_size=64, num_hidden_layers=4, head_dim=16, intermediate_size=64,
                           intermediate_size_mlp=64, attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1,
                           bos_token_id=200000, eos_token_id=[200001, 200007, 200008])
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = root / "hf"
    random_hf_model(cfg, seed=0).save_pretrained(hf_dir)
    out = root / "model-f32.gguf"
    assert main(["convert", "-m", str(hf_dir), "-o", str(out), "--outtype", "f32"]) == 0
    return hf_dir, out

"""A quantizable tiny model (widths 256 so K-quants apply, 4 experts, every layer MoE) with a byte-level
tokenizer.json, built with transformers and shared by the plan/quantize/imatrix tests."""

from __future__ import annotations

import json

import pytest

LLAMA_CPP_CONSTANTS = dict(attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, attn_temperature_tuning=True)
VOCAB = 512
BOS = 256 + 14


@pytest.fixture(scope="session")
def quant_model(tmp_path_factory):
    """HF directory of a 4-layer model (llama.cpp needs a full-attention layer: every 4th): hidden 256, 4 experts
    × 256, top-1."""
    from builders import byte_bpe_tokenizer_json, random_hf_model, tiny_text_config

    cfg = tiny_text_config(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, intermediate_size=256, intermediate_size_mlp=256,
                           num_local_experts=4, bos_token_id=BOS, eos_token_id=[BOS + 1], **LLAMA_CPP_CONSTANTS)
    path = tmp_path_factory.mktemp("quant") / "hf"
    random_hf_model(cfg, seed=3, std=0.05).save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(byte_bpe_tokenizer_json(VOCAB)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sample_text():
    words = ("the river runs by the old mill and the miller sings of rain, wind and the sea; "
             "in the evening the lamps are lit and the children read their books. ")
    return words * 40

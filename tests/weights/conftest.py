"""GGUF fixtures: tiny random transformers Llama 4 checkpoints with llama.cpp's hard-coded constants
(chunk 8192, floor 8192, attn_scale 0.1, NoPE every 4th layer, temperature tuning on), saved with
save_pretrained and converted with `herd convert`."""

from __future__ import annotations

import json

import pytest

# A minimal Llama 4 chat template (llama.cpp detects it as llama4: header_start/header_end).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
LLAMA_CPP_CONSTANTS = dict(attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, no_rope_layer_interval=4,
                           attn_temperature_tuning=True)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """(HF dir, F32 GGUF): 4 layers, hidden 64, 4 experts top-1, the real 202,048-token vocabulary (Meta's
    tiktoken tokenizer, converted) and a chat template; converted with `herd convert`."""
    from builders import random_hf_model, tiny_text_config

    from herd.cli.main import main

    cfg = tiny_text_config(vocab_size=202048, hidden_size=64, num_hidden_layers=4, head_dim=16, intermediate_size=64,
                           intermediate_size_mlp=64, bos_token_id=200000, eos_token_id=[200001, 200007, 200008],
                           **LLAMA_CPP_CONSTANTS)
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = root / "tiny_hf"
    random_hf_model(cfg, seed=0).save_pretrained(hf_dir)
    (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    out = root / "model-f32.gguf"
    assert main(["convert", "-m", str(hf_dir), "-o", str(out), "--outtype", "f32"]) == 0
    return hf_dir, out


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """(HF dir, F32 GGUF) with widths that K-quants fit (hidden, expert and dense widths 256), 2 experts top-1,
    dense and MoE layers alternating (interleave step 2), llama3 RoPE scaling (so rope_freqs.weight is
    written) and a 512-token byte-level tokenizer.json. Kept small: quantizing is slow in pure torch."""
    from builders import byte_bpe_tokenizer_json, random_hf_model, tiny_text_config

    from herd.cli.main import main

    bos = 256 + 14
    cfg = tiny_text_config(vocab_size=SMALL_VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, intermediate_size=256, intermediate_size_mlp=256,
                           num_local_experts=2, interleave_moe_layer_step=2, bos_token_id=bos, eos_token_id=[bos + 1],
                           rope_parameters=LLAMA3_ROPE, **LLAMA_CPP_CONSTANTS)
    root = tmp_path_factory.mktemp("small")
    hf_dir = root / "small_hf"
    random_hf_model(cfg, seed=1, std=0.05).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(byte_bpe_tokenizer_json(SMALL_VOCAB)), encoding="utf-8")
    out = root / "small-f32.gguf"
    assert main(["convert", "-m", str(hf_dir), "-o", str(out)]) == 0
    return hf_dir, out


@pytest.fixture(scope="session")
def q4k_model(small_model):
    """The small model written as a Q4_K GGUF (every quantizable matrix Q4_K) with write_gguf."""
    from herd.config import Config
    from herd.weights.gguf_write import hf_tensor_getter, write_gguf

    hf_dir, f32 = small_model
    config = Config.from_file(hf_dir / "config.json")
    out = f32.with_name("small-Q4_K.gguf")
    write_gguf(out, config, hf_tensor_getter(hf_dir, config), hf_dir, qtypes="Q4_K", progress=False)
    return out

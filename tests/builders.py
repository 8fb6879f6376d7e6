"""Tiny random Llama 4 checkpoints built with transformers (the reference), shared by the tests."""

from __future__ import annotations

import torch

TINY_TEXT = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    intermediate_size_mlp=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    attention_chunk_size=8,
    use_qk_norm=True,
    floor_scale=4,  # small, so temperature tuning is active inside the short test sequences
    attn_scale=0.1,
    interleave_moe_layer_step=1,
    rms_norm_eps=1e-5,
    bos_token_id=0,  # inside the tiny vocabulary
    eos_token_id=[1],
    pad_token_id=None,
)


def tiny_text_config(**overrides):
    from transformers import Llama4TextConfig

    kw = dict(TINY_TEXT)
    kw.update(overrides)
    return Llama4TextConfig(**kw)


def random_hf_model(config, seed: int = 0, std: float = 0.15):
    """A transformers Llama4ForCausalLM with every weight random (incl. norms), in fp32, eval mode."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model




def real_vocab_config(**overrides):
    """A tiny body with the real 202,048-token vocabulary, so the real Llama 4 tokenizer's ids fit."""
    kw = dict(vocab_size=202048, hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64,
              intermediate_size_mlp=64, bos_token_id=200000, eos_token_id=[200001, 200007, 200008])
    kw.update(overrides)
    return tiny_text_config(**kw)

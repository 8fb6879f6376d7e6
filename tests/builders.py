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


def byte_bpe_tokenizer_json(n_vocab: int = 512) -> dict:
    """A small byte-level BPE tokenizer.json with Llama 4's pre-tokenizer: 256 byte tokens, a few merges,
    then special tokens up to n_vocab (BOS = 256 + merges)."""
    from herd.tokenizer.tokenizer import O200K_PATTERN, byte_to_unicode

    b2u = byte_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    merges = []
    for pair in ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "Ġ a", "r e", "Ġ s", "e n", "Ġ w", "o r", "in g"]:
        a, b = pair.split(" ")
        merges.append([a, b])
        vocab.setdefault(a + b, len(vocab))
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(n_vocab - len(vocab) - len(names))]
    added = [{"id": len(vocab) + i, "content": n, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, n in enumerate(names)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }

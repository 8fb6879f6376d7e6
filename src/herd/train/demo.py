"""The demo model: a small Llama 4 (Scout-style) text model that herd trains itself.

Everything but the sizes is Scout's: 16 routed experts with a top-1 sigmoid router plus a shared
expert in every layer, RoPE with QK norm on three of every four layers and a NoPE layer (full
attention, temperature tuning) every fourth, chunked attention of 8192, llama3 RoPE scaling. The
vocabulary is a small byte-level BPE (scripts/train_demo_tokenizer.py) with Llama 4's special tokens
at the end of the id range, so the embedding table stays small and the routed experts hold most of
the parameters, as in the real model. See docs/demo-model.md for the recipe.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config, RopeScaling
from ..model import Llama4TextModel

# Width multiples the demo keeps (GGUF block quantization needs rows of a multiple of 256).
WIDTH_MULTIPLE = 256

DEMO_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,  # each routed expert and the shared expert
    intermediate_size_mlp=1024,  # dense FFN width (unused: every layer is MoE, as in Scout)
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=16,
    num_experts_per_tok=1,
)


def demo_config(
    vocab_size: int,
    bos_token_id: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int | None = None,
    **overrides,
) -> Config:
    """The demo model's Config for a tokenizer with `vocab_size` ids (shape overridable for tests)."""
    shape = dict(DEMO_SHAPE)
    shape.update(overrides)
    layers = shape.pop("num_hidden_layers")
    step = shape.pop("interleave_moe_layer_step", 1)
    no_rope = tuple(int((i + 1) % 4 != 0) for i in range(layers))  # every 4th layer NoPE (Llama 4's default)
    return Config(
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        moe_layers=tuple(range(step - 1, layers, step)),
        no_rope_layers=no_rope,
        layer_types=tuple("chunked_attention" if r else "full_attention" for r in no_rope),
        attention_chunk_size=shape.pop("attention_chunk_size", 8192),
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=8192.0,
        attn_scale=0.1,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192
        ),
        rms_norm_eps=1e-5,
        max_position_embeddings=shape.pop("max_position_embeddings", 131072),
        tie_word_embeddings=False,
        interleave_moe_layer_step=step,
        bos_token_id=bos_token_id,
        eos_token_id=tuple(eos_token_ids),
        pad_token_id=pad_token_id,
        name="herd-demo",
        **shape,
    )


def check_demo_shape(config: Config) -> list[str]:
    """Problems with a config as the demo model (empty when it meets the issue's constraints)."""
    problems = []
    for field in ("hidden_size", "intermediate_size", "intermediate_size_mlp"):
        if getattr(config, field) % WIDTH_MULTIPLE:
            problems.append(f"{field}={getattr(config, field)} is not a multiple of {WIDTH_MULTIPLE}")
    if config.num_hidden_layers < 4 or all(config.uses_rope(i) for i in range(config.num_hidden_layers)):
        problems.append("needs at least 4 layers with a NoPE layer")
    share = parameter_split(config)["experts_share"]
    if share < 0.70:
        problems.append(f"routed experts are {share:.1%} of the parameters (want >= 70%)")
    return problems


def parameter_split(config: Config) -> dict:
    counts = config.parameter_counts()
    total = sum(counts.values())
    return {
        "total": total,
        "active_per_token": config.active_parameters(),
        "by_group": counts,
        "experts_share": counts.get("experts", 0) / total,
    }


@torch.no_grad()
def init_weights(model: Llama4TextModel, seed: int = 0, std: float = 0.02) -> Llama4TextModel:
    """Fresh weights: N(0, std) for matrices, N(0, std / sqrt(2 * layers)) for the projections that write
    into the residual stream (o_proj, down projections), ones for norms. Deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.config.num_hidden_layers
    for name, p in sorted(model.named_parameters()):
        if p.ndim == 1:
            p.fill_(1.0)
            continue
        s = std / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")) else std
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
    return model


def build_model(config: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama4TextModel:
    """A freshly initialised Llama4TextModel (the same module herd runs) for training."""
    model = Llama4TextModel(config)
    init_weights(model, seed)
    return model.to(dtype)

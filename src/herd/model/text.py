"""The Llama 4 text decoder and LM head, built from one Config.

Module names mirror transformers' ``Llama4ForCausalLM`` (``model.layers.N.self_attn.q_proj``,
``feed_forward.router|experts|shared_expert``, ``lm_head``) so HF and PEFT names map one to one; the
one difference is that routed experts are stored per projection as [E, out, in].
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import Config
from ..quant import kernels
from ..runtime.cache import KVCache
from .attention import Attention
from .layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer)
        self.self_attn = Attention(config, layer)
        self.feed_forward: nn.Module = (
            MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size_mlp)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, rot, cache=None, contiguous_from_zero=False):
        h = x + self.self_attn(self.input_layernorm(x), positions, rot, cache, contiguous_from_zero)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Llama4TextModel(nn.Module):
    """Decoder + LM head. ``forward`` returns logits in the weights' dtype."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, T, V] (or [B, 1, V] with last_only).

        With a cache, positions continue each row's sequence and the cache advances by T.
        """
        step = self.__dict__.get("_decode_step")  # a compiled one-token step (herd.runtime.compiled), if attached
        if step is not None and step.covers(input_ids, cache, positions, inputs_embeds):
            return step(input_ids, cache)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        fresh = cache is None or bool((cache.seq_lens == 0).all())
        if positions is None:
            positions = (
                cache.next_positions(t)
                if cache is not None
                else torch.arange(t, device=x.device).expand(b, t)
            )
            contiguous_from_zero = fresh
        else:
            contiguous_from_zero = False
        rot = self.model.rotary_emb(positions)
        # a prompt: large temporaries in every layer, better kept in the heap than mapped afresh (kernels);
        # one token per row is a decode step, batched or not
        with kernels.large_temporaries() if t > 1 else contextlib.nullcontext():
            for i, layer in enumerate(self.model.layers):
                x = layer(x, positions, rot, cache.layers[i] if cache is not None else None, contiguous_from_zero)
        if cache is not None:
            cache.advance(t)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def new_cache(self, batch: int = 1) -> KVCache:
        embed = self.model.embed_tokens
        return KVCache(self.config, batch, dtype=embed.dtype, device=embed.weight.device)

"""Llama 4 attention: GQA, RoPE or NoPE (iRoPE), weightless QK norm, chunked masks, temperature tuning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..runtime.cache import LayerCache
from .layers import Linear, apply_rope, linears, rms_norm


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: key j is visible to query i iff it is filled, not in the future, and
    (chunked layers) in the same chunk of absolute positions."""
    q = q_pos[:, None, :, None]
    k = k_pos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if chunk is not None:
        allowed &= torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor")
    return allowed


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """NoPE-layer query scaling 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale)), fp32 [B, T]."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.use_rope = config.uses_rope(layer)
        self.qk_norm = config.use_qk_norm and self.use_rope  # only RoPE layers have it (both references)
        self.temperature = config.attn_temperature_tuning and not self.use_rope
        self.chunk = config.attention_chunk_size if config.is_chunked(layer) else None
        self.eps = config.rms_norm_eps
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim)
        self.k_proj = Linear(h, self.n_kv * self.head_dim)
        self.v_proj = Linear(h, self.n_kv * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, h)

    def heads(self, q, k, v, positions, rot, rope=apply_rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections [B, T, heads * D] -> q, k, v [B, heads, T, D]: RoPE (`rope` applies `rot`; the compiled
        decode step passes its real-valued form) and QK norm on RoPE layers, temperature tuning on NoPE ones."""
        b, t = q.shape[:2]
        v = v.reshape(b, t, self.n_kv, self.head_dim)
        if self.use_rope:  # q and k heads rotated (and normed) together: the same per-head ops, half the calls
            qk = torch.cat([q.reshape(b, t, self.n_heads, self.head_dim), k.reshape(b, t, self.n_kv, self.head_dim)], 2)
            qk = rope(qk, rot)
            if self.qk_norm:
                qk = rms_norm(qk, self.eps)
            q, k = qk.split([self.n_heads, self.n_kv], dim=2)
        else:
            q = q.reshape(b, t, self.n_heads, self.head_dim)
            k = k.reshape(b, t, self.n_kv, self.head_dim)
        if self.temperature:
            scales = temperature_scales(positions, self.floor_scale, self.attn_scale)
            q = (q * scales[:, :, None, None]).to(q.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rot: torch.Tensor,
        cache: LayerCache | None = None,
        contiguous_from_zero: bool = False,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.heads(*linears(x, [self.q_proj, self.k_proj, self.v_proj]), positions, rot)

        if cache is not None:
            keys, values, key_pos = cache.update(k, v, positions)
        else:
            keys, values, key_pos = k, v, positions

        # A prefill from position 0 with nothing cached is plain causal unless it crosses a chunk boundary.
        plain_causal = contiguous_from_zero and (self.chunk is None or t <= self.chunk)
        if plain_causal:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            mask = (cache.shared_mask(positions, key_pos, self.chunk, attention_mask) if cache is not None
                    else attention_mask(positions, key_pos, self.chunk))
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads, scale=1 / math.sqrt(self.head_dim)
            )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)

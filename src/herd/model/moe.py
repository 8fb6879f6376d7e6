"""Llama 4 mixture of experts: sigmoid top-k router, sparse routed experts, always-on shared expert.

Only the experts a token selected run: tokens are grouped by expert and each selected expert's weights
are touched once per forward. The router score scales the expert's *input* (the references multiply
before the SwiGLU, which is not linear, so this differs from scaling the output).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .layers import Linear, SwiGLU, linear, packed_linear


def expert_linear(x: torch.Tensor, weight: Any, expert: int) -> torch.Tensor:
    """``x @ weight[expert].T`` for a dense [E, out, in] tensor or a quantized expert stack."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight[expert])
    return weight.expert_linear(x, expert)


def expert_linears(x: torch.Tensor, weights: list[Any], expert: int) -> list[torch.Tensor]:
    """[expert_linear(x, w, expert) for w in weights], sharing work on the input where the weights allow."""
    kind = type(weights[0])
    if not issubclass(kind, torch.Tensor) and hasattr(kind, "linears") and all(type(w) is kind for w in weights):
        return kind.linears(x, weights, expert)
    return [expert_linear(x, w, expert) for w in weights]


class Experts(nn.Module):
    """Routed experts stored per projection as [E, out, in] (GGUF's layout)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_packed")  # dense stacks laid out for a faster kernel (quant.kernels)
        if packed is not None and len(packed) == 3:
            gu = type(packed["gate_proj"]).linears(x, [packed["gate_proj"], packed["up_proj"]], e)
            if gu is not None:
                return packed["down_proj"].linear(F.silu(gu[0]).mul_(gu[1]), e)
        g, u = expert_linears(x, [self.gate_proj, self.up_proj], e)
        return expert_linear(F.silu(g).mul_(u), self.down_proj, e)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, scores [N, k] -> sum over k of Expert_e(score * x), [N, H]."""
        n, k = expert_ids.shape
        if n * k == 1 and not self._training_weights():  # one token, top-1 (decoding): no grouping needed
            return self.run_expert(int(expert_ids), x * scores)
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // k  # which token each sorted assignment belongs to
        scaled_in = x[token_of] * scores.reshape(-1)[order, None]
        if self._training_weights():
            return self._forward_trainable(x, scaled_in, token_of, counts)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sl = slice(start, start + count)
            out.index_add_(0, token_of[sl], self.run_expert(e, scaled_in[sl]))
            start += count
        return out

    def _training_weights(self) -> bool:
        stacks = (self.gate_proj, self.up_proj, self.down_proj)
        return all(isinstance(w, torch.Tensor) for w in stacks) and any(w.requires_grad for w in stacks)

    def _forward_trainable(self, x, scaled_in, token_of, counts) -> torch.Tensor:
        """Same result, shaped for autograd (herd.train): each stack is unbound once and the pieces are
        split/concatenated once, so backward allocates one gradient per stack instead of one per expert."""
        gate, up, down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        outs = [
            F.linear(F.silu(F.linear(piece, gate[e])) * F.linear(piece, up[e]), down[e])
            for e, piece in enumerate(scaled_in.split(counts))
            if piece.shape[0]
        ]
        if not outs:
            return torch.zeros_like(x)
        return torch.zeros_like(x).index_add(0, token_of, torch.cat(outs).to(x.dtype))


class Router(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(
            torch.empty(config.num_local_experts, config.hidden_size), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (expert ids [N, k], scores [N, k] in x's dtype, router logits [N, E])."""
        logits = packed_linear(self, x)
        if logits is None:
            logits = linear(x, self.weight)
        top_vals, top_ids = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_vals.float()).to(x.dtype)
        return top_ids, scores, logits


class MoE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)
        # Observers (imatrix, expert-utilisation stats) may set this: called with (expert ids [N, k]).
        self.route_hook = None
        # Training may set this: called with the router logits [N, E] (still in the autograd graph),
        # e.g. for a load-balancing loss.
        self.logits_hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, scores, router_logits = self.router(flat)
        if self.route_hook is not None:
            self.route_hook(ids)
        if self.logits_hook is not None:
            self.logits_hook(router_logits)
        out = self.shared_expert(flat)
        out = out + self.experts(flat, ids, scores)
        return out.view(shape)


__all__ = ["MoE", "Experts", "Router", "Linear", "expert_linear"]

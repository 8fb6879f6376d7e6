"""Building blocks: RMSNorm, RoPE with llama3 scaling, linear layers that accept quantized weights, SwiGLU."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config


class QuantizedWeight(Protocol):
    """What a non-tensor weight must offer (see ``herd.quant.qtensor``): ``y = x @ W.T``."""

    shape: tuple[int, ...]

    def linear(self, x: torch.Tensor) -> torch.Tensor: ...


def linear(x: torch.Tensor, weight: Any) -> torch.Tensor:
    """``x @ weight.T`` for a dense [out, in] tensor or a quantized weight object."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return weight.linear(x)


def packed_linear(module: nn.Module, x: torch.Tensor, name: str = "weight") -> torch.Tensor | None:
    """``x @ W.T`` through the faster layout a kernel set up for ``module.<name>`` (quant.kernels.PackedBF16),
    or None where there is none or it does not apply (then the caller multiplies the weight itself)."""
    pack = module.__dict__.get("_packed", {}).get(name)
    return pack.linear(x) if pack is not None else None


def linears(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """[m(x) for m in modules]: matmuls that read one input (q/k/v, gate/up). When every module is a plain
    ``Linear`` without hooks, their weights may run as one matmul (a packed dense layout, see
    ``PackedBF16.linears``, or quantized weights of one kind, see ``QTensor.linears``); otherwise each module
    is called, so hooks and adapters see it."""
    plain = all(type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)
    if not plain or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return [m(x) for m in modules]
    packs = [m.__dict__.get("_packed", {}).get("weight") for m in modules]
    if all(p is not None for p in packs):
        ys = type(packs[0]).linears(x, packs)
        if ys is not None:
            return ys
    weights = [m.weight for m in modules]
    kind = type(weights[0])
    if not issubclass(kind, torch.Tensor) and hasattr(kind, "linears") and all(type(w) is kind for w in weights):
        return kind.linears(x, weights)
    return [m(x) for m in modules]


def set_weight(module: nn.Module, name: str, value: Any) -> None:
    """Put a tensor or a quantized weight object in ``module.<name>``, replacing whatever was there."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)  # shared (tied) weights stay one object
    elif isinstance(value, torch.Tensor):
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    else:
        object.__setattr__(module, name, value)


class Linear(nn.Module):
    """A bias-free linear layer whose weight may also be a quantized weight (kept quantized)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(self, x)
        return y if y is not None else linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={type(self.weight).__name__}"


class Embedding(nn.Module):
    """Token embedding table whose weight may be quantized (only the looked-up rows are decoded)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.compute_dtype: torch.dtype | None = None  # rows of a quantized table decode to this (float32 if None)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the looked-up rows: the activations' (and the KV cache's) dtype."""
        if isinstance(self.weight, torch.Tensor):
            return self.weight.dtype
        return self.compute_dtype or torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.embedding(ids, self.weight)
        return self.weight.take_rows(ids, dtype=self.dtype)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm computed in fp32 and cast back (Llama 4's QK norm). torch's fused kernel computes
    x * rsqrt(mean(x^2) + eps) in fp32, as the references write it out (one op instead of six); for bfloat16
    input it computes in fp32 and rounds once on output, the same values as casting around it (tested), with
    two ops fewer per norm."""
    if x.dtype in (torch.float32, torch.bfloat16):
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast back to the input dtype *before* the weight multiply, as both references do.
        return rms_norm(x, self.eps) * self.weight


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)). Used for the shared expert and the dense layers."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linears(x, [self.gate_proj, self.up_proj])
        return self.down_proj(F.silu(g) * u)


def rope_inv_freq(config: Config) -> torch.Tensor:
    """Inverse frequencies (fp32) with llama3 scaling or explicit GGUF factors applied."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_freq_factors is not None:
        factors = torch.tensor(config.rope_freq_factors, dtype=torch.float32)
        if factors.numel() != inv.numel():
            raise ValueError(f"rope_freq_factors has {factors.numel()} entries, expected {inv.numel()}")
        return inv / factors
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    # Between the two wavelengths, blend smoothly (empty when low == high, as in Scout).
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        (s.high_freq_factor - s.low_freq_factor) or float("inf")
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def llama3_freq_factors(config: Config) -> torch.Tensor:
    """Per-frequency divisors (base / scaled), the form GGUF stores as ``rope_freqs.weight``."""
    base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
    return base / rope_inv_freq(config.with_(rope_freq_factors=None))


class RotaryEmbedding(nn.Module):
    """Complex (interleaved-pair) RoPE as both Llama 4 references compute it, in fp32."""

    def __init__(self, config: Config):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> complex rotations [B, T, head_dim/2]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated pairwise by rot [B, T, D/2]."""
    xf = x if x.dtype == torch.float32 else x.float()
    xc = torch.view_as_complex(xf.reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rot[:, :, None, :]).flatten(3)
    return out if x.dtype == torch.float32 else out.type_as(x)

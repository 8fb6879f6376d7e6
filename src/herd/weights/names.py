"""The one table of tensor names: herd (canonical) <-> Hugging Face <-> GGUF.

Canonical names are herd's own module paths (``model.layers.{bid}.self_attn.q_proj.weight``). Every
mapping between formats goes through this table; no other module builds tensor names by hand.

HF's fused routed-expert tensor ``experts.gate_up_proj`` [E, in, 2I] (gate half first, ``x @ W``
layout) is split into ``experts.gate_proj`` and ``experts.up_proj`` [E, I, in], and ``experts.down_proj``
[E, I, out] is transposed to [E, out, I], once, here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import Config

# Prefixes under which a multimodal (Llama4ForConditionalGeneration) checkpoint stores the text model.
HF_TEXT_PREFIXES = ("language_model.",)
# Tensors of the vision tower and projector: recognised, not loaded by the text model.
HF_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass(frozen=True)
class TensorName:
    canonical: str  # herd name, with {bid} for the layer index
    hf: str  # HF (Llama4ForCausalLM) name
    gguf: str  # llama.cpp name
    group: str  # tensor class for reports/plans
    where: str  # "global" | "moe" | "dense" | "all" (which layers have it)
    hf_split: str | None = None  # "gate" | "up": half of HF's fused gate_up_proj
    hf_transposed: bool = False  # HF stores it as [E, in, out]


_L = "model.layers.{bid}."
_B = "blk.{bid}."
TABLE: tuple[TensorName, ...] = (
    TensorName("model.embed_tokens.weight", "model.embed_tokens.weight", "token_embd.weight", "embeddings", "global"),
    TensorName("model.norm.weight", "model.norm.weight", "output_norm.weight", "norm", "global"),
    TensorName("lm_head.weight", "lm_head.weight", "output.weight", "output", "global"),
    TensorName(_L + "input_layernorm.weight", _L + "input_layernorm.weight", _B + "attn_norm.weight", "norm", "all"),
    TensorName(_L + "self_attn.q_proj.weight", _L + "self_attn.q_proj.weight", _B + "attn_q.weight", "attention", "all"),
    TensorName(_L + "self_attn.k_proj.weight", _L + "self_attn.k_proj.weight", _B + "attn_k.weight", "attention", "all"),
    TensorName(_L + "self_attn.v_proj.weight", _L + "self_attn.v_proj.weight", _B + "attn_v.weight", "attention", "all"),
    TensorName(
        _L + "self_attn.o_proj.weight", _L + "self_attn.o_proj.weight", _B + "attn_output.weight", "attention", "all"
    ),
    TensorName(
        _L + "post_attention_layernorm.weight", _L + "post_attention_layernorm.weight", _B + "ffn_norm.weight", "norm", "all"
    ),
    TensorName(
        _L + "feed_forward.router.weight", _L + "feed_forward.router.weight", _B + "ffn_gate_inp.weight", "router", "moe"
    ),
    TensorName(
        _L + "feed_forward.experts.gate_proj",
        _L + "feed_forward.experts.gate_up_proj",
        _B + "ffn_gate_exps.weight",
        "experts",
        "moe",
        hf_split="gate",
        hf_transposed=True,
    ),
    TensorName(
        _L + "feed_forward.experts.up_proj",
        _L + "feed_forward.experts.gate_up_proj",
        _B + "ffn_up_exps.weight",
        "experts",
        "moe",
        hf_split="up",
        hf_transposed=True,
    ),
    TensorName(
        _L + "feed_forward.experts.down_proj",
        _L + "feed_forward.experts.down_proj",
        _B + "ffn_down_exps.weight",
        "experts",
        "moe",
        hf_transposed=True,
    ),
    TensorName(
        _L + "feed_forward.shared_expert.gate_proj.weight",
        _L + "feed_forward.shared_expert.gate_proj.weight",
        _B + "ffn_gate_shexp.weight",
        "shared_expert",
        "moe",
    ),
    TensorName(
        _L + "feed_forward.shared_expert.up_proj.weight",
        _L + "feed_forward.shared_expert.up_proj.weight",
        _B + "ffn_up_shexp.weight",
        "shared_expert",
        "moe",
    ),
    TensorName(
        _L + "feed_forward.shared_expert.down_proj.weight",
        _L + "feed_forward.shared_expert.down_proj.weight",
        _B + "ffn_down_shexp.weight",
        "shared_expert",
        "moe",
    ),
    TensorName(
        _L + "feed_forward.gate_proj.weight", _L + "feed_forward.gate_proj.weight", _B + "ffn_gate.weight", "dense_ffn", "dense"
    ),
    TensorName(
        _L + "feed_forward.up_proj.weight", _L + "feed_forward.up_proj.weight", _B + "ffn_up.weight", "dense_ffn", "dense"
    ),
    TensorName(
        _L + "feed_forward.down_proj.weight", _L + "feed_forward.down_proj.weight", _B + "ffn_down.weight", "dense_ffn", "dense"
    ),
)

# GGUF-only tensor: llama3 rope factors shared by all layers.
GGUF_ROPE_FREQS = "rope_freqs.weight"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + "$")


_BY_FORMAT = {
    fmt: [(_pattern(getattr(entry, fmt)), entry) for entry in TABLE] for fmt in ("canonical", "hf", "gguf")
}
# Per-expert HF layout used by pre-quantized (FP8 / bnb / compressed-tensors) checkpoints, [out, in] each.
_HF_PER_EXPERT = re.compile(r"^model\.layers\.(?P<bid>\d+)\.feed_forward\.experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def lookup(name: str, fmt: str) -> list[tuple[TensorName, int | None]]:
    """Entries whose `fmt` pattern matches `name` (two for HF's fused gate_up_proj), with the layer index."""
    out = []
    for pattern, entry in _BY_FORMAT[fmt]:
        m = pattern.match(name)
        if m:
            out.append((entry, int(m["bid"]) if "bid" in pattern.groupindex else None))
    return out


def render(entry: TensorName, fmt: str, bid: int | None) -> str:
    template = getattr(entry, fmt)
    return template.format(bid=bid) if "{bid}" in template else template


def to_gguf(canonical: str) -> str:
    hits = lookup(canonical, "canonical")
    if not hits:
        raise KeyError(canonical)
    return render(hits[0][0], "gguf", hits[0][1])


def from_gguf(gguf_name: str) -> str | None:
    hits = lookup(gguf_name, "gguf")
    return render(hits[0][0], "canonical", hits[0][1]) if hits else None


def group_of(canonical: str) -> str:
    hits = lookup(canonical, "canonical")
    return hits[0][0].group if hits else "other"


def strip_hf_prefix(name: str) -> str | None:
    """HF checkpoint name -> text-model name, or None for vision / projector tensors."""
    if name.startswith(HF_VISION_PREFIXES):
        return None
    for prefix in HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def is_hf_vision(name: str) -> bool:
    return name.startswith(HF_VISION_PREFIXES)


def hf_to_canonical(hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one HF tensor (text-model name) to herd's tensor(s), converting the layout on the way."""
    m = _HF_PER_EXPERT.match(hf_name)
    if m:  # one expert of a stack: the caller stacks [E, out, in] by index
        return [(f"model.layers.{m['bid']}.feed_forward.experts.{m['proj']}_proj[{m['e']}]", tensor)]
    out = []
    for entry, bid in lookup(hf_name, "hf"):
        t = tensor
        if entry.hf_split is not None:
            half = t.shape[-1] // 2
            t = t[..., :half] if entry.hf_split == "gate" else t[..., half:]
        if entry.hf_transposed:
            t = t.transpose(-1, -2)
        out.append((render(entry, "canonical", bid), t))
    return out


def canonical_to_hf(canonical_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_canonical for a whole state dict (re-fusing gate/up): Llama4ForCausalLM names."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in canonical_tensors.items():
        hits = lookup(name, "canonical")
        if not hits:
            continue
        entry, bid = hits[0]
        hf_name = render(entry, "hf", bid)
        if entry.hf_split is not None:
            pending.setdefault(hf_name, {})[entry.hf_split] = t.transpose(-1, -2)
            continue
        out[hf_name] = t.transpose(-1, -2) if entry.hf_transposed else t
    for hf_name, halves in pending.items():
        out[hf_name] = torch.cat([halves["gate"], halves["up"]], dim=-1).contiguous()
    return out


def expected_tensors(config: Config) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """Every canonical tensor the model needs, with its shape and group."""
    h, v, hd = config.hidden_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    e, i, im = config.num_local_experts, config.intermediate_size, config.intermediate_size_mlp
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "feed_forward.router.weight": (e, h),
        "feed_forward.experts.gate_proj": (e, i, h),
        "feed_forward.experts.up_proj": (e, i, h),
        "feed_forward.experts.down_proj": (e, h, i),
        "feed_forward.shared_expert.gate_proj.weight": (i, h),
        "feed_forward.shared_expert.up_proj.weight": (i, h),
        "feed_forward.shared_expert.down_proj.weight": (h, i),
        "feed_forward.gate_proj.weight": (im, h),
        "feed_forward.up_proj.weight": (im, h),
        "feed_forward.down_proj.weight": (h, im),
    }
    for entry in TABLE:
        if entry.where == "global":
            yield entry.canonical, shapes[entry.canonical], entry.group
            continue
        suffix = entry.canonical[len(_L) :]
        for bid in range(config.num_hidden_layers):
            moe = config.is_moe_layer(bid)
            if entry.where == "all" or (entry.where == "moe") == moe:
                yield entry.canonical.format(bid=bid), shapes[suffix], entry.group

"""Quantization plans: which ggml type each tensor of a model gets.

A plan is built from data: ordered ``(regex, type)`` rules matched with ``re.search`` against GGUF tensor
names (as llama-quantize's ``--tensor-type``; the first match wins), on top of fixed rules that no rule can
override (1-D tensors, norms, the router and vision tensors are never quantized) and a fallback when a
row length is not a multiple of the chosen type's block (llama.cpp's replacements). Presets are rule lists
generated for a Config: llama.cpp's standard mixes (the choices of ``llama_tensor_get_type`` for llama4,
see docs/quantization.md) and herd's dynamic ``UD-*`` mixes named after Unsloth's files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..config import Config
from ..errors import HerdError
from ..weights import names
from . import formats

F32 = "F32"
# llama.cpp's replacement when ne0 is not a multiple of the block (llama_tensor_get_type's fallback)
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# llama_ftype values written as general.file_type for each preset
FILE_TYPE = {
    "Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ1_S": 24,
    "UD-IQ1_S": 24, "UD-IQ1_M": 31, "UD-IQ2_XXS": 19, "UD-Q2_K_XL": 10, "UD-Q3_K_XL": 12, "UD-Q4_K_XL": 15,
}

Rule = tuple[str, str]  # (regex on the GGUF name, type name)


@dataclass
class Entry:
    name: str  # canonical (herd) name
    gguf: str
    shape: tuple[int, ...]
    group: str  # names.group_of, with the routed experts split by projection kind
    qtype: str
    reason: str  # "fixed" | "override" | "preset" | "fallback from X"

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return formats.bytes_for(self.qtype, n) if self.qtype not in ("F32", "F16", "BF16") else n * (
            4 if self.qtype == "F32" else 2)


@dataclass
class Plan:
    entries: list[Entry]
    preset: str | None = None
    rules: list[Rule] = field(default_factory=list)

    def types(self) -> dict[str, str]:
        """canonical name -> type name: what ``write_gguf(qtypes=...)`` takes."""
        return {e.name: e.qtype for e in self.entries}

    @property
    def file_type(self) -> int | None:
        return FILE_TYPE.get(self.preset or "")

    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def parameters(self) -> int:
        return sum(math.prod(e.shape) for e in self.entries)

    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes() / self.parameters()

    def by_group(self) -> dict[str, dict]:
        """group -> {"types": {type: count}, "count", "params", "bytes", "bpw"} in file order of first sight."""
        out: dict[str, dict] = {}
        for e in self.entries:
            g = out.setdefault(e.group, {"types": {}, "count": 0, "params": 0, "bytes": 0})
            g["types"][e.qtype] = g["types"].get(e.qtype, 0) + 1
            g["count"] += 1
            g["params"] += math.prod(e.shape)
            g["bytes"] += e.nbytes
        for g in out.values():
            g["bpw"] = 8.0 * g["bytes"] / g["params"]
        return out

    def unencodable(self) -> list[str]:
        """Types in the plan herd can decode but not encode (the IQ1/IQ2/IQ3 grids)."""
        return sorted({e.qtype for e in self.entries if not formats.format_of(e.qtype).can_encode})

    def check_encodable(self) -> None:
        missing = self.unencodable()
        if missing:
            raise HerdError(
                f"plan {self.preset or '(custom)'} uses {', '.join(missing)}, which herd can read but not yet "
                "write (no encoder for the IQ1/IQ2/IQ3 grids); use a K-quant preset or --tensor-type overrides"
            )


# ---------------------------------------------------------------------------------------------- grouping


def tensor_group(canonical: str) -> str:
    """Report/allocation class of a tensor: names.group_of, with routed experts split into gate_up / down."""
    group = names.group_of(canonical)
    if group == "experts":
        return "experts_down" if canonical.endswith("down_proj") else "experts_gate_up"
    return group


def layer_of(gguf_name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(m[1]) if m else None


def is_fixed(canonical: str, shape: tuple[int, ...]) -> bool:
    """Never quantized, whatever the rules say: 1-D tensors, norms, the router, vision."""
    return (len(shape) < 2 or canonical.endswith("norm.weight") or names.group_of(canonical) == "router"
            or canonical.startswith(("vision_model.", "multi_modal_projector.")))


# ---------------------------------------------------------------------------------------------- presets


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layers(ids) -> str:
    return r"blk\.(" + "|".join(str(i) for i in sorted(ids)) + r")\."


def _llamacpp_rules(preset: str, config: Config) -> list[Rule]:
    """llama.cpp's mix for a llama4 model (llama_tensor_get_type_impl, n_expert >= 16, no fused qkv)."""
    n = config.num_hidden_layers
    gqa = config.num_attention_heads // config.num_key_value_heads
    rules: list[Rule] = []

    def when(ids, pattern: str, qtype: str):
        ids = list(ids)
        if ids:
            rules.append((_layers(ids) + pattern, qtype))

    if preset == "Q8_0":
        return [(".", "Q8_0")]
    if preset == "Q6_K":
        return [(r"^output\.", "Q6_K"), (".", "Q6_K")]
    if preset == "Q2_K":
        return [(r"^output\.", "Q6_K"), (r"attn_v\.", "Q4_K" if gqa >= 4 else "Q3_K"), (r"attn_output\.", "Q3_K"),
                (r"ffn_down", "Q3_K"), (".", "Q2_K")]
    if preset == "Q3_K_M":
        when(range(min(2, n)), r"attn_v\.", "Q5_K")
        rules += [(r"attn_v\.", "Q4_K"), (r"attn_output\.", "Q4_K")]
        when(range(n // 16), r"ffn_down", "Q5_K")
        return [(r"^output\.", "Q6_K")] + rules + [(r"ffn_down", "Q4_K"), (".", "Q3_K")]
    if preset in ("Q4_K_M", "Q5_K_M"):
        base, more = ("Q4_K", "Q6_K") if preset == "Q4_K_M" else ("Q5_K", "Q6_K")
        when([i for i in range(n) if _more_bits(i, n)], r"attn_v\.", more)
        when([i for i in range(n) if _more_bits(i, n)], r"ffn_down", more)
        return [(r"^output\.", "Q6_K")] + rules + [(".", base)]
    if preset in ("IQ2_XXS", "IQ1_S"):
        low = preset
        # the first n/8 ffn_down tensors in file order (exps and shexp each count) get Q2_K
        first = n // 8
        down_layers = sorted({i // 2 for i in range(first)}) if config.num_local_experts > 1 else list(range(first))
        when(down_layers, r"ffn_down", "Q2_K")
        return [(r"^output\.", "Q5_K"), (r"^token_embd\.", "Q2_K"), (r"attn_v\.", "Q4_K"),
                (r"attn_output\.", "IQ2_XXS")] + rules + [(r"ffn_down", low), (".", low)]
    raise KeyError(preset)


# herd's dynamic mixes: routed experts low, the rest (attention, shared expert, embeddings, output) higher,
# the first MoE layer's experts (the hardest to calibrate) a step up. Bits of the routed experts follow
# Unsloth's table: 1.78 / 1.93 / 2.42 / 2.71 / 3.5 / 4.5.
_UD = {
    #            experts gate/up, experts down, first-MoE-layer down, attention, attn_v, shared, shared down, embd, output
    "UD-IQ1_S": ("IQ1_S", "IQ2_XXS", "Q2_K", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q4_K", "Q6_K"),
    "UD-IQ1_M": ("IQ1_M", "IQ2_XXS", "Q2_K", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q4_K", "Q6_K"),
    "UD-IQ2_XXS": ("IQ2_XXS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q4_K", "Q6_K"),
    "UD-Q2_K_XL": ("Q2_K", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q3_K", "Q6_K"),
    "UD-Q3_K_XL": ("Q3_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_K", "Q6_K", "Q5_K", "Q6_K"),
    "UD-Q4_K_XL": ("Q4_K", "Q4_K", "Q5_K", "Q5_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K"),
}


def _dynamic_rules(preset: str, config: Config) -> list[Rule]:
    gate_up, down, first_down, attn, attn_v, shared, shared_down, embd, output = _UD[preset]
    first_moe = min(config.moe_layers) if config.moe_layers else 0
    return [
        (r"^output\.", output),
        (r"^token_embd\.", embd),
        (rf"^blk\.{first_moe}\.ffn_down_exps", first_down),
        (r"ffn_down_exps", down),
        (r"ffn_(gate|up)_exps", gate_up),
        (r"ffn_down_shexp|ffn_down\.", shared_down),
        (r"_shexp|ffn_(gate|up)\.", shared),
        (r"attn_v\.", attn_v),
        (r"attn_", attn),
    ]


LLAMACPP_PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ2_XXS", "IQ1_S")
DYNAMIC_PRESETS = tuple(_UD)
PRESETS = LLAMACPP_PRESETS + DYNAMIC_PRESETS


def check_preset(preset: str) -> str:
    key = preset.strip().upper()
    if key not in PRESETS:
        raise HerdError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return key


def preset_rules(preset: str, config: Config) -> list[Rule]:
    key = check_preset(preset)
    if key in LLAMACPP_PRESETS:
        return _llamacpp_rules(key, config)
    return _dynamic_rules(key, config)


# ---------------------------------------------------------------------------------------------- building


def parse_rule(text: str) -> Rule:
    """A ``--tensor-type REGEX=TYPE`` argument -> (regex, type name); errors name the argument."""
    pattern, sep, qtype = text.rpartition("=")
    if not sep or not pattern or not qtype:
        raise HerdError(f"--tensor-type {text!r}: expected REGEX=TYPE, e.g. ffn_down_exps=q4_k")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise HerdError(f"--tensor-type {text!r}: bad regex ({exc})") from None
    try:
        name = formats.format_of(qtype).name
    except HerdError:
        raise HerdError(f"--tensor-type {text!r}: unknown type {qtype!r}") from None
    return pattern.lower(), name


def _first_match(rules: list[Rule], gguf_name: str) -> str | None:
    for pattern, qtype in rules:
        if re.search(pattern, gguf_name):
            return qtype
    return None


def build_plan(config: Config, preset: str | None = None, overrides: list[Rule] | None = None,
               types: dict[str, str] | None = None) -> Plan:
    """The plan for `config`: fixed rules, then `overrides` (user ``--tensor-type`` rules, first match wins),
    then `types` (canonical name -> type, e.g. from auto allocation), then the preset's rules; tensors no
    rule names keep F16 (a preset always ends with a catch-all)."""
    from ..weights.gguf_write import tensor_plan

    rules = preset_rules(preset, config) if preset else []
    overrides = list(overrides or [])
    entries = []
    for name, shape in tensor_plan(config):
        gguf = names.to_gguf(name)
        group = tensor_group(name)
        if is_fixed(name, shape):
            entries.append(Entry(name, gguf, tuple(shape), group, F32, "fixed"))
            continue
        if (q := _first_match(overrides, gguf)) is not None:
            qtype, reason = q, "override"
        elif types and name in types:
            qtype, reason = formats.format_of(types[name]).name, "allocated"
        elif (q := _first_match(rules, gguf)) is not None:
            qtype, reason = formats.format_of(q).name, "preset"
        else:
            qtype, reason = "F16", "default"
        f = formats.format_of(qtype)
        if shape[-1] % f.block_size:
            replaced = _FALLBACK.get(f.name, "F16")
            if shape[-1] % formats.format_of(replaced).block_size:
                replaced = "F16"
            qtype, reason = replaced, f"fallback from {f.name}"
        entries.append(Entry(name, gguf, tuple(shape), group, qtype, reason))
    return Plan(entries, preset=preset.strip().upper() if preset else None, rules=overrides + rules)


def header_estimate(plan: Plan, vocab_size: int) -> int:
    """A generous bound on the GGUF header (metadata + tensor infos), for size predictions."""
    return 4096 + vocab_size * 40 + len(plan.entries) * 96


def describe(plan: Plan, vocab_size: int) -> str:
    """The dry-run table: per tensor group, its types, tensor count, bytes and bits per weight."""
    lines = [f"{'group':<18} {'types':<34} {'tensors':>7} {'MiB':>9} {'bpw':>6}"]
    for group, g in plan.by_group().items():
        kinds = ", ".join(f"{t}×{c}" for t, c in g["types"].items())
        lines.append(f"{group:<18} {kinds:<34} {g['count']:>7} {g['bytes'] / 2**20:>9.2f} {g['bpw']:>6.2f}")
    size = plan.tensor_bytes() + header_estimate(plan, vocab_size)
    lines.append(f"predicted file size {size / 2**20:.2f} MiB ({size:,} bytes), {plan.bits_per_weight():.3f} bits per weight")
    return "\n".join(lines)


__all__ = ["Plan", "Entry", "build_plan", "preset_rules", "check_preset", "parse_rule", "describe", "PRESETS", "LLAMACPP_PRESETS",
           "DYNAMIC_PRESETS", "tensor_group", "is_fixed", "header_estimate"]

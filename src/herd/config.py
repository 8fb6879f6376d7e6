"""Llama 4 configuration: one `Config` for the text decoder (plus an optional `VisionConfig`).

Built from a Hugging Face ``config.json`` (``Llama4ForConditionalGeneration`` with nested
``text_config``/``vision_config``, or ``Llama4ForCausalLM`` with ``model_type: llama4_text``),
from GGUF metadata (see ``herd.weights.gguf``), or from a preset (``scout``, ``maverick``).
Field names follow transformers so that a reader of either can map them one to one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

TEXT_MODEL_TYPES = ("llama4_text",)
MULTIMODAL_MODEL_TYPES = ("llama4",)


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only kind Llama 4 uses)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    multi_modal_projector_bias: bool = False

    def num_parameters(self, text_hidden: int) -> int:
        h, i = self.hidden_size, self.intermediate_size
        patches = (self.image_size // self.patch_size) ** 2
        n = self.num_channels * self.patch_size**2 * h  # patch embedding (no bias)
        n += h + (patches + 1) * h  # class embedding + positional embedding
        n += 4 * h  # pre/post layernorm weight + bias
        per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        n += self.num_hidden_layers * per_layer
        shuffled = int(h / self.pixel_shuffle_ratio**2)
        n += shuffled * self.projector_input_dim + self.projector_input_dim * self.projector_output_dim
        n += self.vision_output_dim * text_hidden  # multi_modal_projector.linear_1
        return n


@dataclass(frozen=True)
class Config:
    """Text decoder configuration. Derived per-layer lists are always filled in."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of every routed expert and of the shared expert
    intermediate_size_mlp: int  # width of the dense FFN in non-MoE layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = the layer uses RoPE, 0 = NoPE (transformers' convention)
    layer_types: tuple[str, ...]  # "chunked_attention" | "full_attention" per layer
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors, as GGUF's rope_freqs.weight stores them
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    interleave_moe_layer_step: int = 1
    bos_token_id: int | None = 200000
    eos_token_id: tuple[int, ...] = (200001, 200007, 200008)
    pad_token_id: int | None = 200018
    vision: VisionConfig | None = None
    architecture: str = "Llama4ForCausalLM"
    name: str = ""

    # ----- per-layer questions the model asks -----
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        return self.layer_types[layer] == "chunked_attention" and self.attention_chunk_size is not None

    def with_(self, **changes: Any) -> "Config":
        return replace(self, **changes)

    # ----- sizes for planning -----
    def layer_parameters(self, layer: int) -> dict[str, int]:
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2
        counts = {"attention": attn, "norms": 2 * h}
        if self.is_moe_layer(layer):
            counts["router"] = self.num_local_experts * h
            counts["experts"] = self.num_local_experts * 3 * h * self.intermediate_size
            counts["shared_expert"] = 3 * h * self.intermediate_size
        else:
            counts["dense_ffn"] = 3 * h * self.intermediate_size_mlp
        return counts

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by group (text decoder, plus vision if configured)."""
        totals: dict[str, int] = {"embeddings": self.vocab_size * self.hidden_size}
        for layer in range(self.num_hidden_layers):
            for k, v in self.layer_parameters(layer).items():
                totals[k] = totals.get(k, 0) + v
        totals["norms"] += self.hidden_size
        if not self.tie_word_embeddings:
            totals["output"] = self.vocab_size * self.hidden_size
        if self.vision is not None:
            totals["vision"] = self.vision.num_parameters(self.hidden_size)
        return totals

    def num_parameters(self) -> int:
        return sum(self.parameter_counts().values())

    def active_parameters(self) -> int:
        """Parameters used per generated token: every non-expert weight plus k of E experts per MoE layer.

        The embedding table is a lookup (one row per token) but is counted, as Meta's "17B active" does.
        Vision is not counted (it runs only on images).
        """
        counts = self.parameter_counts()
        counts.pop("vision", None)
        experts = counts.pop("experts", 0)
        return sum(counts.values()) + experts * self.num_experts_per_tok // max(self.num_local_experts, 1)

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        """K+V cache bytes added per token of context (chunked layers stop growing past the chunk)."""
        per_layer = 2 * self.num_key_value_heads * self.head_dim * bytes_per_value
        full_layers = sum(1 for i in range(self.num_hidden_layers) if not self.is_chunked(i))
        return per_layer * full_layers

    # ----- constructors -----
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Config":
        return _from_hf(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (expected a Hugging Face config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return _from_hf(raw, str(path))

    @classmethod
    def preset(cls, name: str) -> "Config":
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} (expected one of: {', '.join(sorted(PRESETS))})")
        return PRESETS[key]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _Fields:
    """Typed access to a config dict that names the source and field in every error."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: field {self.prefix}{key} = {value!r}, expected {expected}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def int(self, key: str, default: Any = ..., minimum: int = 1) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is ...:
                raise ConfigError(f"{self.source}: missing field {self.prefix}{key} (expected an integer)")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(key, f"an integer >= {minimum}", value)
        return value

    def float(self, key: str, default: Any = ...) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is ...:
                raise ConfigError(f"{self.source}: missing field {self.prefix}{key} (expected a number)")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        # Real hub configs carry ints here (Scout: "attn_temperature_tuning": 4); truthiness is what the
        # reference code uses, so accept any int/bool.
        if isinstance(value, (bool, int)):
            return bool(value)
        raise self._fail(key, "a boolean", value)

    def int_list(self, key: str, length: int | None = None, values: tuple[int, ...] | None = None) -> Any:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._fail(key, "a list of integers", value)
        if length is not None and len(value) != length:
            raise self._fail(key, f"a list of {length} integers (one per layer)", value)
        if values is not None and any(v not in values for v in value):
            raise self._fail(key, f"entries in {values}", value)
        return tuple(value)


def _rope(f: _Fields) -> tuple[float, RopeScaling | None]:
    """Read RoPE from either spelling: 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = f.raw.get("rope_parameters")
    scaling = f.raw.get("rope_scaling")
    theta = f.float("rope_theta", 500000.0)
    where = "rope_scaling"
    if isinstance(params, dict):
        theta = _Fields(params, f.source, f.prefix + "rope_parameters.").float("rope_theta", theta)
        if scaling is None:
            scaling, where = params, "rope_parameters"
    elif params is not None:
        raise f._fail("rope_parameters", "an object", params)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise f._fail("rope_scaling", "an object or null", scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{f.source}: field {f.prefix}{where}.rope_type = {kind!r}, expected 'llama3' or 'default'")
    s = _Fields(scaling, f.source, f.prefix + where + ".")
    return theta, RopeScaling(
        factor=s.float("factor"),
        low_freq_factor=s.float("low_freq_factor"),
        high_freq_factor=s.float("high_freq_factor"),
        original_max_position_embeddings=s.int("original_max_position_embeddings"),
    )


def _eos(value: Any, f: _Fields) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise f._fail("eos_token_id", "an integer or a list of integers", value)


def _vision(raw: Any, source: str) -> VisionConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field vision_config = {raw!r}, expected an object")
    f = _Fields(raw, source, "vision_config.")
    d = VisionConfig()
    return VisionConfig(
        hidden_size=f.int("hidden_size", d.hidden_size),
        num_hidden_layers=f.int("num_hidden_layers", d.num_hidden_layers),
        num_attention_heads=f.int("num_attention_heads", d.num_attention_heads),
        intermediate_size=f.int("intermediate_size", d.intermediate_size),
        image_size=f.int("image_size", d.image_size),
        patch_size=f.int("patch_size", d.patch_size),
        num_channels=f.int("num_channels", d.num_channels),
        pixel_shuffle_ratio=f.float("pixel_shuffle_ratio", d.pixel_shuffle_ratio),
        projector_input_dim=f.int("projector_input_dim", d.projector_input_dim),
        projector_output_dim=f.int("projector_output_dim", d.projector_output_dim),
        vision_output_dim=f.int("vision_output_dim", d.vision_output_dim),
        rope_theta=f.float("rope_theta", d.rope_theta),
        norm_eps=f.float("norm_eps", d.norm_eps),
        multi_modal_projector_bias=f.flag("multi_modal_projector_bias", d.multi_modal_projector_bias),
    )


def _from_hf(raw: dict[str, Any], source: str) -> Config:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in MULTIMODAL_MODEL_TYPES:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: model_type 'llama4' needs a text_config object")
        vision = _vision(raw.get("vision_config"), source)
        arch = "Llama4ForConditionalGeneration"
        prefix = "text_config."
        top_tie = raw.get("tie_word_embeddings")
    elif model_type in TEXT_MODEL_TYPES:
        text, vision, arch, prefix, top_tie = raw, None, "Llama4ForCausalLM", "", None
    else:
        raise ConfigError(
            f"{source}: model_type = {model_type!r} (architectures {architectures}); "
            "expected a Llama 4 config ('llama4' or 'llama4_text')"
        )
    f = _Fields(text, source, prefix)
    layers = f.int("num_hidden_layers")
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise f._fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
    head_dim = f.int("head_dim", hidden // heads)
    experts = f.int("num_local_experts", 16, minimum=0)
    top_k = f.int("num_experts_per_tok", 1)
    if experts and top_k > experts:
        raise f._fail("num_experts_per_tok", f"at most num_local_experts ({experts})", top_k)

    step = f.int("interleave_moe_layer_step", 1)
    moe_layers = f.int_list("moe_layers")
    if moe_layers is None:
        moe_layers = tuple(range(step - 1, layers, step))
    if any(not 0 <= i < layers for i in moe_layers):
        raise f._fail("moe_layers", f"layer indices in [0, {layers})", list(moe_layers))
    if moe_layers and experts == 0:
        raise f._fail("num_local_experts", "at least 1 when MoE layers exist", experts)

    interval = f.int("no_rope_layer_interval", 4)
    no_rope = f.int_list("no_rope_layers", layers, (0, 1))
    if not no_rope:  # transformers treats an empty list like a missing one
        no_rope = tuple(int((i + 1) % interval != 0) for i in range(layers))
    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = tuple("chunked_attention" if r else "full_attention" for r in no_rope)
    else:
        ok = isinstance(layer_types, list) and len(layer_types) == layers
        if not ok or any(t not in ("chunked_attention", "full_attention") for t in layer_types):
            raise f._fail("layer_types", f"{layers} entries of 'chunked_attention'/'full_attention'", layer_types)
        layer_types = tuple(layer_types)
    chunk = f.int("attention_chunk_size", None)
    if "attention_chunk_size" not in text:
        chunk = 8192

    theta, scaling = _rope(f)
    tie = f.flag("tie_word_embeddings", bool(top_tie) if top_tie is not None else False)
    pad = text.get("pad_token_id", raw.get("pad_token_id"))
    return Config(
        vocab_size=f.int("vocab_size", 202048),
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", 8192),
        intermediate_size_mlp=f.int("intermediate_size_mlp", 16384),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        moe_layers=tuple(sorted(moe_layers)),
        no_rope_layers=no_rope,
        layer_types=layer_types,
        attention_chunk_size=chunk,
        use_qk_norm=f.flag("use_qk_norm", True),
        attn_temperature_tuning=f.flag("attn_temperature_tuning", True),
        floor_scale=f.float("floor_scale", 8192.0),
        attn_scale=f.float("attn_scale", 0.1),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=f.float("rms_norm_eps", 1e-5),
        max_position_embeddings=f.int("max_position_embeddings", 131072),
        tie_word_embeddings=tie,
        interleave_moe_layer_step=step,
        bos_token_id=text.get("bos_token_id", raw.get("bos_token_id", 200000)),
        eos_token_id=_eos(text.get("eos_token_id", raw.get("eos_token_id")), f),
        pad_token_id=pad if isinstance(pad, int) else None,
        vision=vision,
        architecture=arch,
    )


def _preset(name: str, *, experts: int, step: int, qk_norm: bool, rope: RopeScaling | None, max_pos: int) -> Config:
    layers = 48
    no_rope = tuple(int((i + 1) % 4 != 0) for i in range(layers))
    return Config(
        vocab_size=202048,
        hidden_size=5120,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_hidden_layers=layers,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        num_local_experts=experts,
        num_experts_per_tok=1,
        moe_layers=tuple(range(step - 1, layers, step)),
        no_rope_layers=no_rope,
        layer_types=tuple("chunked_attention" if r else "full_attention" for r in no_rope),
        attention_chunk_size=8192,
        use_qk_norm=qk_norm,
        attn_temperature_tuning=True,
        floor_scale=8192.0,
        attn_scale=0.1,
        rope_theta=500000.0,
        rope_scaling=rope,
        rms_norm_eps=1e-5,
        max_position_embeddings=max_pos,
        interleave_moe_layer_step=step,
        vision=VisionConfig(),
        architecture="Llama4ForConditionalGeneration",
        name=name,
    )


# Published dimensions of the instruct checkpoints (see docs/architecture.md and the Llama 4 fact sheet).
PRESETS: dict[str, Config] = {
    "scout": _preset(
        "Llama-4-Scout-17B-16E-Instruct",
        experts=16,
        step=1,
        qk_norm=True,
        rope=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192),
        max_pos=10485760,
    ),
    "maverick": _preset(
        "Llama-4-Maverick-17B-128E-Instruct", experts=128, step=2, qk_norm=False, rope=None, max_pos=1048576
    ),
}

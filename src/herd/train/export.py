"""Write a trained model as a Hugging Face checkpoint directory that ``herd.load`` (and transformers) read.

Layout: ``config.json`` (``model_type: llama4_text``, ``Llama4ForCausalLM``), ``model.safetensors`` in HF
tensor names (``herd.weights.names.canonical_to_hf`` re-fuses the expert stacks), the tokenizer files
copied from a tokenizer directory, and ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict:
    """A transformers ``Llama4TextConfig``-shaped config.json for a text-only Config."""
    rope_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "intermediate_size_mlp": config.intermediate_size_mlp,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "interleave_moe_layer_step": config.interleave_moe_layer_step,
        "moe_layers": list(config.moe_layers),
        "no_rope_layers": list(config.no_rope_layers),
        "layer_types": list(config.layer_types),
        "attention_chunk_size": config.attention_chunk_size,
        "use_qk_norm": config.use_qk_norm,
        "attn_temperature_tuning": config.attn_temperature_tuning,
        "floor_scale": int(config.floor_scale) if float(config.floor_scale).is_integer() else config.floor_scale,
        "attn_scale": config.attn_scale,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    generation: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `model` (a herd Llama4TextModel) as an HF checkpoint directory; returns the directory."""
    from safetensors.torch import save_file

    from ..weights.names import canonical_to_hf

    config: Config = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    canonical = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {k: v.to(dtype).contiguous() for k, v in canonical_to_hf(canonical).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(hf, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", hf_config_dict(config, dtype))
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    gen.update(generation or {})
    _write_json(out / "generation_config.json", gen)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / (name + ".tmp"))
                os.replace(out / (name + ".tmp"), out / name)
    return out

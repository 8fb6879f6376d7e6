"""Config parsing against transformers' own config handling, the real hub quirks, and the presets."""

from __future__ import annotations

import json

import pytest
import torch

from herd import Config, ConfigError
from herd.cli.main import main as herd_main

# A Scout instruct config.json as published (text part trimmed to what matters), 4.x spellings.
SCOUT_JSON = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "model_type": "llama4",
    "boi_token_index": 200080,
    "eoi_token_index": 200081,
    "image_token_index": 200092,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "llama4_text",
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": 4,
        "attn_scale": 0.1,
        "floor_scale": 8192,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "pad_token_id": 200018,
        "head_dim": 128,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "interleave_moe_layer_step": 1,
        "max_position_embeddings": 10485760,
        "no_rope_layers": [1, 1, 1, 0] * 12,
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "use_qk_norm": True,
        "vocab_size": 202048,
    },
    "vision_config": {
        "hidden_size": 1408,
        "image_size": 336,
        "intermediate_size": 5632,
        "num_attention_heads": 16,
        "num_hidden_layers": 34,
        "patch_size": 14,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 4096,
        "projector_output_dim": 4096,
        "vision_output_dim": 4096,
        "rope_theta": 10000,
        "norm_eps": 1e-05,
    },
}


def test_scout_hub_config_quirks_are_accepted():
    cfg = Config.from_hf_dict(SCOUT_JSON)
    assert cfg.attn_temperature_tuning is True  # the int 4 that transformers' strict config rejects
    assert cfg.rope_scaling.factor == 16.0 and cfg.rope_scaling.high_freq_factor == 1.0
    assert cfg.moe_layers == tuple(range(48))
    assert [i for i in range(48) if not cfg.uses_rope(i)] == list(range(3, 48, 4))
    assert cfg.vision.hidden_size == 1408
    # equals the preset built from the published dimensions
    preset = Config.preset("scout")
    for field in ("hidden_size", "num_hidden_layers", "moe_layers", "no_rope_layers", "layer_types", "rope_scaling",
                  "intermediate_size", "intermediate_size_mlp", "num_local_experts", "use_qk_norm", "vision"):
        assert getattr(cfg, field) == getattr(preset, field), field


def test_derived_fields_match_transformers():
    """moe_layers / no_rope_layers / layer_types / head_dim derived as transformers derives them."""
    from transformers import Llama4TextConfig

    cases = [
        dict(num_hidden_layers=6, interleave_moe_layer_step=2),
        dict(num_hidden_layers=8, no_rope_layer_interval=3),
        dict(num_hidden_layers=5, moe_layers=[0, 4], no_rope_layers=[1, 0, 1, 0, 1]),
        dict(num_hidden_layers=4, head_dim=32, hidden_size=96, num_attention_heads=3, num_key_value_heads=1),
    ]
    for case in cases:
        hf = Llama4TextConfig(**case)
        ours = Config.from_hf_dict(hf.to_dict())
        assert ours.moe_layers == tuple(hf.moe_layers)
        assert ours.no_rope_layers == tuple(hf.no_rope_layers)
        assert ours.layer_types == tuple(hf.layer_types)
        assert ours.head_dim == hf.head_dim
    # a config without head_dim (4.x files) derives hidden / heads, as transformers did
    raw = Llama4TextConfig(**cases[3]).to_dict()
    raw.pop("head_dim")
    assert Config.from_hf_dict(raw).head_dim == 32


def test_rope_spellings_4x_and_5x_agree():
    from herd.model.layers import rope_inv_freq
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = dict(SCOUT_JSON["text_config"])
    old = Config.from_hf_dict(text)
    new_spelling = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_theta")}
    new_spelling["rope_parameters"] = dict(text["rope_scaling"], rope_theta=500000.0)
    new = Config.from_hf_dict(new_spelling)
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta
    # and the frequencies equal transformers' llama3 computation
    hf = Llama4TextConfig(**{k: v for k, v in new_spelling.items() if k != "attn_temperature_tuning"})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.equal(rope_inv_freq(new), want)


def test_rejects_unsupported_rope_type():
    text = dict(SCOUT_JSON["text_config"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope_scaling.rope_type = 'yarn', expected 'llama3' or 'default'"):
        Config.from_hf_dict(text)


def test_missing_required_field_names_it():
    text = {k: v for k, v in SCOUT_JSON["text_config"].items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="missing field hidden_size"):
        Config.from_hf_dict(text, "x/config.json")
    mm = dict(SCOUT_JSON, text_config=dict(SCOUT_JSON["text_config"], no_rope_layers=[1, 0]))
    with pytest.raises(ConfigError, match=r"text_config.no_rope_layers .* expected a list of 48 integers"):
        Config.from_hf_dict(mm)


def test_invalid_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Config.from_file(tmp_path)


@pytest.mark.parametrize("name,total,vision", [("scout", 108_641_793_536, 871_932_416), ("maverick", 401_583_781_376, 871_932_416)])
def test_preset_parameter_counts_equal_transformers(name, total, vision):
    """Counted by instantiating transformers' model on the meta device (no memory) with the same dims."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = Config.preset(name)
    text = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, intermediate_size_mlp=cfg.intermediate_size_mlp,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_local_experts=cfg.num_local_experts,
        interleave_moe_layer_step=cfg.interleave_moe_layer_step, vocab_size=cfg.vocab_size, use_qk_norm=cfg.use_qk_norm,
    )
    v = cfg.vision
    vision_cfg = dict(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
        projector_input_dim=v.projector_input_dim, projector_output_dim=v.projector_output_dim,
        vision_output_dim=v.vision_output_dim, pixel_shuffle_ratio=v.pixel_shuffle_ratio,
    )
    with torch.device("meta"):
        hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision_cfg))
    hf_total = sum(p.numel() for p in hf.parameters())
    assert cfg.num_parameters() == hf_total == total
    assert cfg.parameter_counts()["vision"] == vision
    assert 17.0e9 < cfg.active_parameters() < 17.4e9  # "17B active"


def test_info_preset_cli(capsys):
    assert herd_main(["info", "--preset", "scout", "--bpw", "4.5"]) == 0
    out = capsys.readouterr().out
    assert "total parameters   108.64B" in out and "active per token   17.17B" in out
    assert "4.5 bpw: weights" in out
    assert herd_main(["info", "--preset", "llama2"]) == 1
    assert "unknown preset 'llama2'" in capsys.readouterr().err

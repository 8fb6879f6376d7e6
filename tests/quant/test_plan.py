"""Type plans: llama.cpp's mixes for llama4 (src/llama-quant.cpp rules, as documented in
shared/reference/gguf-llama4.md), herd's dynamic presets, rule precedence, fixed rules and fallbacks."""

import dataclasses

import pytest

from herd import HerdError
from herd.config import Config
from herd.quant.plan import DYNAMIC_PRESETS, build_plan, parse_rule


def _types(config, preset, overrides=None):
    return {e.gguf: e.qtype for e in build_plan(config, preset, overrides).entries}


@pytest.fixture(scope="module")
def scout():
    return Config.preset("scout")


def test_q4_k_m_on_scout(scout):
    t = _types(scout, "Q4_K_M")
    # use_more_bits(i, 48): i < 6, i >= 42, or (i - 6) % 3 == 2
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["blk.0.attn_v.weight"] == "Q6_K" and t["blk.10.attn_v.weight"] == "Q4_K"
    assert t["blk.8.ffn_down_exps.weight"] == "Q6_K" and t["blk.9.ffn_down_exps.weight"] == "Q4_K"
    assert t["blk.8.ffn_down_shexp.weight"] == "Q6_K" and t["blk.47.ffn_down_exps.weight"] == "Q6_K"
    assert t["blk.9.ffn_gate_exps.weight"] == "Q4_K" and t["blk.9.attn_q.weight"] == "Q4_K"
    assert t["blk.9.ffn_gate_inp.weight"] == "F32" and t["blk.9.attn_norm.weight"] == "F32"
    assert t["output_norm.weight"] == "F32"


def test_q2_k_and_q3_k_m_on_scout(scout):
    t = _types(scout, "Q2_K")
    assert t["blk.5.attn_v.weight"] == "Q4_K"  # n_gqa = 40 / 8 = 5 >= 4
    assert t["blk.5.attn_output.weight"] == "Q3_K" and t["blk.5.ffn_down_exps.weight"] == "Q3_K"
    assert t["blk.5.ffn_up_exps.weight"] == "Q2_K" and t["token_embd.weight"] == "Q2_K"
    t = _types(scout, "Q3_K_M")
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [t[f"blk.{i}.ffn_down_exps.weight"] for i in (2, 3)] == ["Q5_K", "Q4_K"]  # layer < 48 / 16
    assert t["blk.3.ffn_gate_exps.weight"] == "Q3_K" and t["blk.3.attn_output.weight"] == "Q4_K"


def test_iq_mixes_on_scout(scout):
    t = _types(scout, "IQ2_XXS")
    assert t["output.weight"] == "Q5_K" and t["token_embd.weight"] == "Q2_K" and t["blk.4.attn_v.weight"] == "Q4_K"
    # the first 48 / 8 = 6 ffn_down tensors in file order (exps and shexp alternate): layers 0-2
    assert t["blk.2.ffn_down_shexp.weight"] == "Q2_K" and t["blk.3.ffn_down_exps.weight"] == "IQ2_XXS"
    assert _types(scout, "IQ1_S")["blk.3.ffn_up_exps.weight"] == "IQ1_S"


def test_demo_shaped_q2_k_uses_q3_k_attn_v():
    cfg = dataclasses.replace(Config.preset("scout"), num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         moe_layers=(0, 1, 2, 3), no_rope_layers=(1, 1, 1, 0),
                                         layer_types=("chunked_attention",) * 3 + ("full_attention",))
    assert _types(cfg, "Q2_K")["blk.0.attn_v.weight"] == "Q3_K"  # n_gqa = 2


def test_dynamic_presets_expert_bits_follow_the_table(scout):
    table = {"UD-IQ1_S": 1.78, "UD-IQ1_M": 1.93, "UD-IQ2_XXS": 2.42, "UD-Q2_K_XL": 2.71, "UD-Q3_K_XL": 3.5,
             "UD-Q4_K_XL": 4.5}
    assert set(table) == set(DYNAMIC_PRESETS)
    bits = {}
    for preset in table:
        plan = build_plan(scout, preset)
        g = plan.by_group()
        expert_bytes = g["experts_gate_up"]["bytes"] + g["experts_down"]["bytes"]
        bits[preset] = 8 * expert_bytes / (g["experts_gate_up"]["params"] + g["experts_down"]["params"])
        assert abs(bits[preset] - table[preset]) < 0.2, (preset, bits[preset])
        # attention and shared experts get 4-6 bits, router and norms stay F32
        assert 4.0 <= g["attention"]["bpw"] <= 6.6 and 4.0 <= g["shared_expert"]["bpw"] <= 6.6
        assert set(g["router"]["types"]) == {"F32"} and set(g["norm"]["types"]) == {"F32"}
    assert list(bits.values()) == sorted(bits.values())


def test_iq_presets_are_refused_for_writing_but_planned(scout):
    plan = build_plan(scout, "UD-IQ1_S")
    assert plan.unencodable() == ["IQ1_S", "IQ2_XXS"]
    with pytest.raises(HerdError, match="IQ1_S, IQ2_XXS.*not yet write"):
        plan.check_encodable()


def test_overrides_first_match_wins_and_beat_the_preset(scout):
    rules = [parse_rule(r"blk\.0\.ffn_down_exps=q8_0"), parse_rule("ffn_down_exps=Q5_K"), parse_rule("ffn_gate_inp=Q4_0")]
    t = _types(scout, "Q2_K", rules)
    assert t["blk.0.ffn_down_exps.weight"] == "Q8_0" and t["blk.1.ffn_down_exps.weight"] == "Q5_K"
    assert t["blk.1.ffn_gate_inp.weight"] == "F32"  # the router is never quantized, whatever the rules say
    assert t["blk.1.ffn_up_exps.weight"] == "Q2_K"


def test_fallback_when_rows_do_not_fit_the_block():
    from builders import tiny_text_config

    cfg = Config.from_hf_dict(tiny_text_config(hidden_size=128, intermediate_size=128, head_dim=32).to_dict())
    for preset, want in (("Q4_K_M", "Q5_0"), ("Q2_K", "Q4_0")):
        e = {x.gguf: x for x in build_plan(cfg, preset).entries}["blk.1.ffn_gate_exps.weight"]
        assert (e.qtype, e.reason) == (want, f"fallback from {preset[:4]}")
    e = {x.gguf: x for x in build_plan(cfg, None, [parse_rule("attn_q=iq4_xs")]).entries}["blk.0.attn_q.weight"]
    assert e.qtype == "IQ4_NL"


@pytest.mark.parametrize("bad", ["ffn_down", "ffn_(=q4_k", "ffn_down=Q9_Z", "=q4_k"])
def test_bad_rules_are_one_line_errors(bad):
    with pytest.raises(HerdError, match="--tensor-type"):
        parse_rule(bad)

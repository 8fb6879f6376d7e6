"""GGUF in and out: `herd convert` writes what llama.cpp's converter writes; herd reads it back (and any
quantized / split GGUF) to the same model; malformed files fail with one line naming the file."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch

import herd
from herd.cli.main import main as herd_main
from herd.quant.formats import QType, format_of
from herd.weights.gguf import GGUFFile
from herd.weights.gguf_write import hf_tensor_getter, write_gguf

IDS = torch.randint(0, 202048, (2, 40), generator=torch.Generator().manual_seed(0))
SMALL_IDS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))

U32, I32, F32_, BOOL, STR, ARR, F64 = 4, 5, 6, 7, 8, 9, 12
# The keys llama.cpp's convert_hf_to_gguf.py writes for the tiny model, in its order, with their types.
CONVERTER_KEYS = [
    ("general.architecture", STR), ("general.type", STR), ("general.name", STR), ("general.size_label", STR),
    ("llama4.block_count", U32), ("llama4.context_length", U32), ("llama4.embedding_length", U32),
    ("llama4.feed_forward_length", U32), ("llama4.attention.head_count", U32),
    ("llama4.attention.head_count_kv", U32), ("llama4.rope.freq_base", F32_),
    ("llama4.attention.layer_norm_rms_epsilon", F32_), ("llama4.expert_count", U32),
    ("llama4.expert_used_count", U32), ("llama4.attention.key_length", U32),
    ("llama4.attention.value_length", U32), ("general.file_type", U32), ("llama4.vocab_size", U32),
    ("llama4.rope.dimension_count", U32), ("llama4.interleave_moe_layer_step", U32),
    ("llama4.expert_feed_forward_length", U32), ("general.quantization_version", U32),
    ("tokenizer.ggml.model", STR), ("tokenizer.ggml.pre", STR), ("tokenizer.ggml.tokens", ARR),
    ("tokenizer.ggml.token_type", ARR), ("tokenizer.ggml.merges", ARR), ("tokenizer.ggml.bos_token_id", U32),
    ("tokenizer.ggml.eos_token_id", U32), ("tokenizer.ggml.padding_token_id", U32),
    ("tokenizer.ggml.add_bos_token", BOOL), ("tokenizer.ggml.add_eos_token", BOOL),
    ("tokenizer.ggml.add_sep_token", BOOL), ("tokenizer.chat_template", STR),
]
HERD_KEYS = [("herd.attention_chunk_size", U32), ("herd.no_rope_layers", ARR), ("herd.layer_types", ARR),
             ("herd.moe_layers", ARR), ("herd.use_qk_norm", BOOL), ("herd.attn_temperature_tuning", BOOL),
             ("herd.floor_scale", F64), ("herd.attn_scale", F64)]

TEXTS = [
    "Hello world", "  leading spaces", "trailing spaces   ", "日本語のテキスト", "🎉 emoji 👍🏽 and ZWJ 👩‍👩‍👧",
    "émoji café naïve", "def f(x):\n\treturn x ** 2\n", "<|eot|> as plain text", "<|begin_of_text|>",
    "a" * 300, "12345 67.89 1,000,000", "Привет, мир!", "\n\n\nnewlines\r\n\r\nCRLF", "It's we're they'll I'M",
    "x" + " " * 50 + "y", "URL: https://example.com/path?q=1&r=2", "العربية", "हिन्दी पाठ", "한국어 텍스트",
    "tab\tseparated\tvalues", "MiXeD CaSe WoRdS", "can't won't shouldn't", "$$$ %%% ^^^", "ÀÉÎÕÜ",
    "{\"json\": [1, 2, 3]}", "snake_case_identifier", "camelCaseIdentifier", "1+1=2; 2*3=6", "   ", "",
    "Ελληνικά", "עברית", "ไทย", "😀😃😄😁", "a\u0301 combining", "\u00a0non-breaking\u00a0space",
]


def _kld(ref_logits, logits):
    p = ref_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def hf_llm(gguf_model):
    return herd.load(gguf_model[0])


@pytest.fixture(scope="module")
def small_hf(small_model):
    return herd.load(small_model[0])


@pytest.fixture(scope="module")
def small_ref_logits(small_hf):
    return small_hf.logits(SMALL_IDS)


# ---------------------------------------------------------------------------------------------- F32 round trip


def test_f32_gguf_logits_equal_hf(gguf_model, hf_llm):
    llm = herd.load(gguf_model[1])
    diff = (llm.logits(IDS) - hf_llm.logits(IDS)).abs().max().item()
    print(f"F32 GGUF vs HF checkpoint: max |dlogits| {diff:.1e}")
    assert diff <= 1e-5
    c, ref = llm.config, hf_llm.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                  "moe_layers", "no_rope_layers", "layer_types", "attention_chunk_size", "use_qk_norm",
                  "attn_temperature_tuning", "floor_scale", "attn_scale", "rope_theta", "max_position_embeddings"):
        assert getattr(c, field) == pytest.approx(getattr(ref, field)), field
    assert llm.chat_template == (gguf_model[0] / "chat_template.jinja").read_text()
    assert llm.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_small_model_with_rope_freqs_and_dense_layers(small_model, small_hf, small_ref_logits):
    llm = herd.load(small_model[1])
    assert llm.config.rope_freq_factors is not None and llm.config.moe_layers == (1, 3)
    assert "rope_freqs.weight" in GGUFFile(small_model[1]).tensors
    assert (llm.logits(SMALL_IDS) - small_ref_logits).abs().max().item() <= 1e-5


def test_metadata_keys_and_tensors_as_the_converter_writes_them(gguf_model):
    r = GGUFFile(gguf_model[1])
    assert [(k, r.field_types[k]) for k in r.fields] == CONVERTER_KEYS + HERD_KEYS
    kv = r.fields
    want = {
        "general.architecture": "llama4", "general.type": "model", "general.name": "tiny_hf",
        "llama4.block_count": 4, "llama4.context_length": 131072, "llama4.embedding_length": 64,
        "llama4.feed_forward_length": 64, "llama4.attention.head_count": 4, "llama4.attention.head_count_kv": 2,
        "llama4.rope.freq_base": 500000.0, "llama4.expert_count": 4, "llama4.expert_used_count": 1,
        "llama4.attention.key_length": 16, "llama4.attention.value_length": 16, "general.file_type": 0,
        "llama4.vocab_size": 202048, "llama4.rope.dimension_count": 16, "llama4.interleave_moe_layer_step": 1,
        "llama4.expert_feed_forward_length": 64, "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama4", "tokenizer.ggml.bos_token_id": 200000,
        "tokenizer.ggml.eos_token_id": 200008,  # the checkpoint has a chat template: an instruct model
        "tokenizer.ggml.padding_token_id": 200018, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_sep_token": False,
        "herd.attention_chunk_size": 8192, "herd.no_rope_layers": [1, 1, 1, 0], "herd.moe_layers": [0, 1, 2, 3],
        "herd.use_qk_norm": True, "herd.attn_temperature_tuning": True, "herd.floor_scale": 8192.0,
        "herd.attn_scale": 0.1,
    }
    for key, value in want.items():
        assert kv[key] == pytest.approx(value), key
    assert abs(kv["llama4.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-10
    assert kv["general.size_label"].startswith("4x")
    assert len(kv["tokenizer.ggml.tokens"]) == 202048 and len(kv["tokenizer.ggml.merges"]) == 439802
    types = kv["tokenizer.ggml.token_type"]
    assert set(types[:200000]) == {1} and set(types[200000:]) == {3}
    assert kv["tokenizer.ggml.tokens"][200008] == "<|eot|>"
    # tensors: names, types, ggml shapes {ne0, ne1, ne2} as llama.cpp's load_arch_tensors expects them
    D, F, E, V, hd = 64, 64, 4, 202048, 16
    want_t = {"token_embd.weight": [D, V], "output_norm.weight": [D], "output.weight": [D, V]}
    for i in range(4):
        want_t |= {f"blk.{i}.attn_norm.weight": [D], f"blk.{i}.attn_q.weight": [D, 4 * hd],
                   f"blk.{i}.attn_k.weight": [D, 2 * hd], f"blk.{i}.attn_v.weight": [D, 2 * hd],
                   f"blk.{i}.attn_output.weight": [4 * hd, D], f"blk.{i}.ffn_norm.weight": [D],
                   f"blk.{i}.ffn_gate_inp.weight": [D, E], f"blk.{i}.ffn_gate_exps.weight": [D, F, E],
                   f"blk.{i}.ffn_up_exps.weight": [D, F, E], f"blk.{i}.ffn_down_exps.weight": [F, D, E],
                   f"blk.{i}.ffn_gate_shexp.weight": [D, F], f"blk.{i}.ffn_up_shexp.weight": [D, F],
                   f"blk.{i}.ffn_down_shexp.weight": [F, D]}
    got = {t.name: list(t.shape) for t in r.tensors.values()}
    assert got == want_t
    assert {format_of(t.type_id).name for t in r.tensors.values()} == {"F32"}


def test_converter_type_rules_for_f16_and_bf16(small_model, tmp_path):
    """Norms, the router and 1-D tensors stay F32; matrices take --outtype; general.file_type follows."""
    for outtype, name, file_type in (("f16", "F16", 1), ("bf16", "BF16", 32)):
        out = tmp_path / f"m-{outtype}.gguf"
        assert herd_main(["convert", "-m", str(small_model[0]), "-o", str(out), "--outtype", outtype]) == 0
        r = GGUFFile(out)
        assert r.fields["general.file_type"] == file_type
        for t in r.tensors.values():
            want = "F32" if len(t.shape) == 1 or "norm" in t.name or "ffn_gate_inp" in t.name else name
            assert format_of(t.type_id).name == want, t.name
        llm = herd.load(out)  # dtype None: as stored
        assert llm.model.model.norm.weight.dtype == {"f16": torch.float16, "bf16": torch.bfloat16}[outtype]


def test_expert_layout_matches_hf(gguf_model):
    """ffn_gate_exps[e] is the first half of gate_up_proj[e], transposed (the converter's split)."""
    from safetensors.torch import load_file

    hf = load_file(gguf_model[0] / "model.safetensors")
    gate_up = hf["model.layers.1.feed_forward.experts.gate_up_proj"]  # [E, in, 2I]
    down = hf["model.layers.1.feed_forward.experts.down_proj"]  # [E, I, out]
    f = GGUFFile(gguf_model[1])
    get = lambda n: f.read_float(f.tensors[n])  # noqa: E731  (canonical order [E, out, in])
    inter = gate_up.shape[-1] // 2
    assert torch.equal(get("blk.1.ffn_gate_exps.weight"), gate_up[..., :inter].transpose(1, 2))
    assert torch.equal(get("blk.1.ffn_up_exps.weight"), gate_up[..., inter:].transpose(1, 2))
    assert torch.equal(get("blk.1.ffn_down_exps.weight"), down.transpose(1, 2))
    assert torch.equal(get("blk.1.attn_q.weight"), hf["model.layers.1.self_attn.q_proj.weight"])  # no permutation


# ---------------------------------------------------------------------------------------------- tokenizer


def test_gguf_tokenizer_ids_equal_tiktoken(gguf_model):
    from herd.tokenizer import Tokenizer

    ref = Tokenizer.default()
    tok = herd.load(gguf_model[1]).tokenizer
    assert len(TEXTS) >= 30
    for s in TEXTS:
        assert tok.encode(s) == ref.encode(s), s
        assert tok.encode(s, bos=True) == ref.encode(s, bos=True), s
        assert tok.decode(tok.encode(s)) == s
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (200000, 200001, 200008, 200018)
    assert tok.special_tokens == ref.special_tokens


def test_gguf_tokenizer_from_a_tokenizer_json(small_model):
    """A checkpoint's own tokenizer.json goes into the GGUF and comes back with the same ids."""
    from herd.tokenizer import Tokenizer

    ref = Tokenizer.from_hf_json(small_model[0] / "tokenizer.json")
    tok = herd.load(small_model[1]).tokenizer
    for s in TEXTS[:12] + ["the then there in on and an or sing"]:
        assert tok.encode(s) == ref.encode(s), s
    kv = GGUFFile(small_model[1]).fields
    assert kv["tokenizer.ggml.bos_token_id"] == 270 and kv["tokenizer.ggml.eos_token_id"] == 271
    assert len(kv["tokenizer.ggml.merges"]) == 14


# ---------------------------------------------------------------------------------------------- quantized


def _check_quantized(path, qtype, ref_logits, bound, f32_path):
    from herd.quant.qtensor import QTensor

    r = GGUFFile(path)
    assert r.fields["general.file_type"] == {QType.Q8_0: 7, QType.Q4_K: 15}[qtype]
    for t in r.tensors.values():
        quantizable = len(t.shape) > 1 and "norm" not in t.name and "ffn_gate_inp" not in t.name
        assert format_of(t.type_id).name == (qtype.name if quantizable else "F32"), t.name
    llm = herd.load(path)
    layers = llm.model.model.layers
    assert isinstance(layers[1].feed_forward.experts.gate_proj, QTensor)
    assert isinstance(layers[0].feed_forward.down_proj.weight, QTensor)  # a dense layer
    assert isinstance(llm.model.model.embed_tokens.weight, QTensor) and isinstance(llm.model.lm_head.weight, QTensor)
    assert isinstance(layers[1].feed_forward.router.weight, torch.Tensor)
    logits = llm.logits(SMALL_IDS)
    kld = _kld(ref_logits, logits)
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"{qtype.name}: mean KLD vs F32 {kld:.2e}, top-1 agreement {top1:.3f}, file {path.stat().st_size:,} bytes "
          f"(F32 {f32_path.stat().st_size:,})")
    assert kld < bound
    return llm, logits


def test_q8_0_gguf_runs_close_to_f32(small_model, small_hf, small_ref_logits, tmp_path):
    out = tmp_path / "small-Q8_0.gguf"
    write_gguf(out, small_hf.config, hf_tensor_getter(small_model[0], small_hf.config), small_model[0],
               qtypes=QType.Q8_0, progress=False)
    _check_quantized(out, QType.Q8_0, small_ref_logits, 2e-3, small_model[1])


def test_q4_k_gguf_runs_close_to_f32(q4k_model, small_model, small_ref_logits, tmp_path):
    from herd.quant import kernels
    from herd.weights.loader import iter_model_tensors

    llm, logits = _check_quantized(q4k_model, QType.Q4_K, small_ref_logits, 0.1, small_model[1])
    # the quantized matmuls compute exactly what the decoded weights do: an F32 file of them gives the same logits
    dense = {n: (v.dequantize() if hasattr(v, "qtype") else v) for n, v in iter_model_tensors(llm.model)}
    out = tmp_path / "decoded.gguf"
    write_gguf(out, llm.config, dense, llm.gguf, progress=False)
    with kernels.exact():  # block decoding, not the int8 kernels' rounding
        assert (herd.load(out).logits(SMALL_IDS) - llm.logits(SMALL_IDS)).abs().max().item() <= 1e-5


def test_rewriting_a_quantized_gguf_copies_its_blocks(q4k_model, tmp_path):
    """Quantized weights go back out as they are, whatever order the tensors arrive in (as `herd quantize`
    re-writes a GGUF): the file is byte for byte the same."""
    from herd.weights.loader import iter_model_tensors

    llm = herd.load(q4k_model)
    pairs = list(iter_model_tensors(llm.model))[::-1]
    again = tmp_path / "again.gguf"
    write_gguf(again, llm.config, iter(pairs), llm.gguf, chat_template=llm.chat_template, name="small-Q4_K",
               qtypes={n: v.qtype for n, v in pairs if hasattr(v, "qtype")}, progress=False)
    assert again.read_bytes() == q4k_model.read_bytes()


def test_mixed_plan(small_model, small_hf, small_ref_logits, tmp_path):
    """A per-tensor plan (types as QType, ggml id or name); the rest follows the converter's rules."""
    config = small_hf.config
    plan = {"model.layers.1.feed_forward.experts.gate_proj": "Q4_0", "model.layers.1.feed_forward.experts.up_proj": 6,
            "model.layers.1.feed_forward.experts.down_proj": QType.Q8_0, "model.layers.0.self_attn.v_proj.weight": "q5_1",
            "lm_head.weight": "Q4_1", "model.layers.0.input_layernorm.weight": "F16"}
    out = tmp_path / "mixed.gguf"
    write_gguf(out, config, hf_tensor_getter(small_model[0], config), small_model[0], qtypes=plan, progress=False)
    types = {t.name: format_of(t.type_id).name for t in GGUFFile(out).tensors.values()}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_0" and types["blk.1.ffn_up_exps.weight"] == "Q5_0"
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.attn_v.weight"] == "Q5_1"
    assert types["output.weight"] == "Q4_1" and types["blk.0.attn_norm.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == "F32" and types["blk.3.ffn_down_exps.weight"] == "F32"
    assert _kld(small_ref_logits, herd.load(out).logits(SMALL_IDS)) < 0.02


def test_bad_plan_is_a_herd_error(gguf_model, hf_llm, tmp_path):
    with pytest.raises(herd.HerdError, match="rows of 64 cannot be stored as Q4_K"):
        write_gguf(tmp_path / "x.gguf", hf_llm.config, hf_tensor_getter(gguf_model[0], hf_llm.config),
                   None, qtypes={"model.layers.0.self_attn.o_proj.weight": "Q4_K"}, progress=False)
    with pytest.raises(herd.HerdError, match="unknown tensor type 'Q9_Z'"):
        write_gguf(tmp_path / "x.gguf", hf_llm.config, {}, None, qtypes="Q9_Z", progress=False)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- herd keys


def test_nondefault_constants_round_trip_through_herd_keys(tmp_path):
    """A model whose constants llama.cpp cannot express (chunk 8, floor 4, NoPE pattern, no QK norm) keeps them."""
    from builders import random_hf_model, tiny_text_config

    from herd.weights.gguf_write import GGUFVocab

    cfg = tiny_text_config(attention_chunk_size=8, floor_scale=4, use_qk_norm=False, no_rope_layers=[1, 0, 1, 0],
                           interleave_moe_layer_step=2)
    hf_dir = tmp_path / "odd"
    random_hf_model(cfg, seed=3).save_pretrained(hf_dir)
    ref = herd.load(hf_dir)
    vocab = GGUFVocab([f"t{i}" for i in range(cfg.vocab_size)], [1] * cfg.vocab_size, [])
    out = tmp_path / "odd.gguf"
    write_gguf(out, ref.config, hf_tensor_getter(hf_dir, ref.config), vocab, progress=False)
    llm = herd.load(out)
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    assert (llm.logits(ids) - ref.logits(ids)).abs().max().item() <= 1e-5
    for field in ("attention_chunk_size", "floor_scale", "use_qk_norm", "no_rope_layers", "moe_layers", "layer_types"):
        assert getattr(llm.config, field) == getattr(ref.config, field), field
    # without herd's keys a reader falls back to llama.cpp's hard-coded values
    plain = tmp_path / "plain.gguf"
    write_gguf(plain, ref.config, hf_tensor_getter(hf_dir, ref.config), vocab, herd_keys=False, progress=False)
    c = GGUFFile(plain).config()
    assert not any(k.startswith("herd.") for k in GGUFFile(plain).fields)
    assert (c.attention_chunk_size, c.floor_scale, c.attn_scale, c.use_qk_norm) == (8192, 8192.0, 0.1, True)
    assert c.no_rope_layers == (1, 1, 1, 0) and c.moe_layers == (1, 3)


# ---------------------------------------------------------------------------------------------- split


def test_split_gguf_loads_from_first_part(small_model, small_ref_logits, tmp_path):
    out = tmp_path / "split.gguf"
    assert herd_main(["convert", "-m", str(small_model[0]), "-o", str(out), "--split-max-tensors", "20"]) == 0
    parts = sorted(tmp_path.glob("split-*.gguf"))
    assert [p.name for p in parts] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    first = GGUFFile(parts[0])
    assert (first.fields["split.no"], first.fields["split.count"], first.fields["split.tensors.count"]) == (0, 3, 48)
    assert len(GGUFFile(parts[1]).tensors) == 48  # any part opens the whole model
    llm = herd.load(parts[0])
    assert (llm.logits(SMALL_IDS) - small_ref_logits).abs().max().item() <= 1e-5
    (tmp_path / "one").mkdir()
    moved = parts[2].rename(tmp_path / "one" / parts[2].name)
    with pytest.raises(herd.FormatError, match="split-00003-of-00003.gguf.*missing"):
        herd.load(parts[0])
    moved.rename(parts[2])
    parts[1].rename(tmp_path / "renamed.gguf")
    shutil.copy(parts[0], parts[1])  # part 2 is a copy of part 1: split.no says so
    with pytest.raises(herd.FormatError, match="split.no = 0"):
        herd.load(parts[0])


# ---------------------------------------------------------------------------------------------- info


def test_info_on_gguf(small_model, capsys):
    assert herd_main(["info", str(small_model[1])]) == 0
    out = capsys.readouterr().out
    assert "tensors: 48" in out and "tokenizer.ggml.tokens" in out and "[512 items]" in out
    assert "experts" in out and "bits per weight" in out and "F32" in out
    assert "model     llama4: 4 layers (2 MoE), hidden 256, 2 experts top-1, vocab 512" in out


# ---------------------------------------------------------------------------------------------- malformed


def _copy(src, tmp_path, name="bad.gguf"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def _expect_error(path, *fragments, header=True):
    with pytest.raises(herd.HerdError) as info:
        herd.load(path)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg, msg
    for f in fragments:
        assert f in msg, msg
    # `herd info` fails the same way on a file it cannot parse; it shows bad metadata, saying what is wrong
    assert herd_main(["info", str(path)]) == (1 if header else 0)


def _patch(path, marker: bytes, skip: int, new: bytes):
    """Overwrite bytes right after the first occurrence of `marker` in the file (plus `skip` bytes)."""
    data = bytearray(path.read_bytes())
    i = data.index(marker) + len(marker) + skip
    data[i : i + len(new)] = new
    path.write_bytes(bytes(data))


def test_truncated_file(small_model, tmp_path):
    data = small_model[1].read_bytes()
    for cut in (3, 20, 5000, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        _expect_error(p)


def test_wrong_magic(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"", 0, b"GGML")
    _expect_error(p, "not a valid GGUF file", "bad magic")


def test_unknown_type_id(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    _patch(p, b"blk.0.attn_q.weight", 4 + 2 * 8, (77).to_bytes(4, "little"))
    _expect_error(p, "blk.0.attn_q.weight has unknown tensor type 77")


def test_tensor_data_past_end_of_file(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, (13).to_bytes(8, "little") + b"output.weight", 4 + 2 * 8 + 4, (1 << 40).to_bytes(8, "little"))
    _expect_error(p, "tensor output.weight data ends at byte", "past the end of the file")


def test_misaligned_tensor_offset(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, (13).to_bytes(8, "little") + b"output.weight", 4 + 2 * 8 + 4, (8).to_bytes(8, "little"))
    _expect_error(p, "not a multiple of the alignment")


def test_metadata_with_wrong_value_type(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"llama4.block_count", 0, struct.pack("<I", 6))  # declared f32 instead of u32 (same width)
    _expect_error(p, "llama4.block_count", "expected an integer", header=False)


def test_unknown_metadata_value_type(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"llama4.expert_count", 0, struct.pack("<I", 42))
    _expect_error(p, "llama4.expert_count has unknown value type 42")


def test_metadata_string_with_a_huge_length(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"general.name", 4, struct.pack("<Q", 1 << 62))
    _expect_error(p, "truncated header")


def test_not_llama4(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"general.architecture", 4 + 8, b"llama2")
    _expect_error(p, "general.architecture = 'llama2'", "expected 'llama4'", header=False)


def test_inconsistent_hyperparameters(small_model, tmp_path):
    p = _copy(small_model[1], tmp_path)
    _patch(p, b"llama4.attention.head_count_kv", 4, struct.pack("<I", 3))
    _expect_error(p, "head_count_kv = 3", "a divisor of the head count", header=False)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(herd.HerdError, match="nothing.gguf"):
        herd.load(tmp_path / "nothing.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty)


def test_convert_writes_nothing_on_failure(small_model, tmp_path):
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(small_model[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out.gguf"
    assert herd_main(["convert", "-m", str(bad), "-o", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.glob("out.gguf*"))


def test_interrupted_write_leaves_no_file(small_model, small_hf, tmp_path):
    get = hf_tensor_getter(small_model[0], small_hf.config)

    def failing(name):
        if "layers.2" in name:
            raise KeyboardInterrupt
        return get(name)

    out = tmp_path / "x.gguf"
    with pytest.raises(KeyboardInterrupt):
        write_gguf(out, small_hf.config, failing, small_model[0], progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_fuzzed_headers_raise_only_herd_errors(small_model, tmp_path):
    """~60 s of random byte edits inside the header: loading either works or raises a HerdError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    data = small_model[1].read_bytes()
    f = GGUFFile(small_model[1])
    header_end = min(t.offset for t in f.tensors.values())
    target = tmp_path / "fuzz.gguf"

    @settings(max_examples=10**6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.one_of(st.none(), st.integers(0, len(data))))
    def check(edits, cut):
        buf = bytearray(data)
        for pos, byte in edits:
            buf[pos] = byte
        target.write_bytes(bytes(buf[:cut] if cut is not None else buf))
        try:
            herd.load(target)
        except herd.HerdError as exc:
            assert "\n" not in str(exc) and "fuzz.gguf" in str(exc)

    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        check()


def test_float_tensors_are_copy_on_write_views_of_the_file(gguf_model, tmp_path):
    """F32/F16/BF16 tensors are mapped, not read: nothing is copied until written, and a write stays private
    (the file, and a second reader of it, keep the stored values)."""
    import shutil

    path = tmp_path / "copy.gguf"
    shutil.copy(gguf_model[1], path)
    before = path.read_bytes()
    reader = GGUFFile(path)
    tensors = dict(reader.canonical_tensors())
    norm = tensors["model.norm.weight"]
    t = next(t for t in reader.tensors.values() if t.name == "output_norm.weight")
    mapping = reader._cow_maps[t.part]
    start = mapping.ctypes.data
    assert start <= norm.data_ptr() < start + mapping.size  # inside the file's mapping: not a copy
    stored = norm.clone()
    norm.add_(1.0)  # writable
    assert torch.equal(dict(GGUFFile(path).canonical_tensors())["model.norm.weight"], stored)
    assert path.read_bytes() == before and t.nbytes == stored.numel() * 4
    assert torch.equal(reader.read_float(t), stored)  # the file itself is untouched

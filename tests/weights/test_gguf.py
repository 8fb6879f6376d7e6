"""GGUF in and out: herd's converter output, read back by herd (and gguf-py), equals the HF checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import herd
from herd.cli.main import main as herd_main
from herd.weights.gguf_write import F32, OUTTYPES, checkpoint_vocab, hf_tensor_getter, write_gguf

IDS = torch.randint(0, 202048, (2, 40), generator=torch.Generator().manual_seed(0))


def _kld(ref_logits, logits):
    p = ref_logits.log_softmax(-1)
    q = logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def hf_llm(gguf_model):
    return herd.load(gguf_model[0])


def test_f32_gguf_logits_equal_hf(gguf_model, hf_llm):
    llm = herd.load(gguf_model[1])
    assert (llm.logits(IDS) - hf_llm.logits(IDS)).abs().max().item() <= 1e-5
    assert llm.config.attention_chunk_size == 8192 and llm.config.use_qk_norm
    assert [llm.config.uses_rope(i) for i in range(4)] == [True, True, True, False]


def test_metadata_and_tensors_as_llama_cpp_converter_writes_them(gguf_model):
    from herd.weights.gguf import GGUFFile

    r = GGUFFile(gguf_model[1])
    kv = r.fields
    want = {
        "general.architecture": "llama4", "general.type": "model", "llama4.block_count": 4,
        "llama4.context_length": 131072, "llama4.embedding_length": 64, "llama4.feed_forward_length": 64,
        "llama4.attention.head_count": 4, "llama4.attention.head_count_kv": 2, "llama4.rope.freq_base": 500000.0,
        "llama4.expert_count": 4, "llama4.expert_used_count": 1, "llama4.attention.key_length": 16,
        "llama4.attention.value_length": 16, "general.file_type": 0, "llama4.vocab_size": 202048,
        "llama4.rope.dimension_count": 16, "llama4.interleave_moe_layer_step": 1,
        "llama4.expert_feed_forward_length": 64, "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama4", "tokenizer.ggml.bos_token_id": 200000, "tokenizer.ggml.padding_token_id": 200018,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in want.items():
        assert kv[key] == pytest.approx(value), key
    assert abs(kv["llama4.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-10
    assert len(kv["tokenizer.ggml.tokens"]) == 202048 and len(kv["tokenizer.ggml.merges"]) == 439802
    assert "llama4.attention.sliding_window" not in kv  # only written when no layer is chunked
    from herd.quant.formats import format_of

    types = {t.name: (format_of(t.type_id).name, list(t.shape)) for t in r.tensors.values()}
    assert len(types) == 55
    assert types["token_embd.weight"] == ("F32", [64, 202048])
    assert types["blk.0.ffn_gate_inp.weight"] == ("F32", [64, 4])
    assert types["blk.0.ffn_gate_exps.weight"] == ("F32", [64, 64, 4])
    assert types["blk.0.ffn_down_exps.weight"] == ("F32", [64, 64, 4])
    assert types["blk.3.attn_k.weight"] == ("F32", [64, 32])
    assert types["blk.0.ffn_down_shexp.weight"] == ("F32", [64, 64])


def test_expert_layout_matches_hf(gguf_model, hf_llm):
    """ffn_gate_exps[e] is the first half of gate_up_proj[e], transposed (the converter's split)."""
    from safetensors.torch import load_file

    from herd.weights.gguf import GGUFFile

    hf = load_file(gguf_model[0] / "model.safetensors")
    gate_up = hf["model.layers.1.feed_forward.experts.gate_up_proj"]  # [E, in, 2I]
    r = GGUFFile(gguf_model[1]).tensors

    def f32(name):  # ggml shape {in, I, E} -> numpy [E, I, in]
        t = r[name]
        return torch.from_numpy(np.array(t.data).view(np.float32).reshape(tuple(reversed(t.shape))))

    gate, up = f32("blk.1.ffn_gate_exps.weight"), f32("blk.1.ffn_up_exps.weight")
    inter = gate.shape[1]
    assert torch.equal(gate, gate_up[..., :inter].transpose(1, 2))
    assert torch.equal(up, gate_up[..., inter:].transpose(1, 2))


def test_gguf_tokenizer_ids_equal_meta(gguf_model):
    from llama_models.llama4.tokenizer import Tokenizer as Meta

    meta = Meta.get_instance()
    tok = herd.load(gguf_model[1]).tokenizer
    for s in ["Hello world", "  leading spaces", "日本語 🎉 émoji", "def f(x):\n\treturn x", "<|eot|> as text",
              "a" * 300, "12345 67.89", "Привет, мир!", "\n\n\nnewlines", "It's we're they'll"]:
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False), s
        assert tok.decode(tok.encode(s)) == s
    assert tok.bos_id == 200000 and tok.eot_id == 200008


@pytest.mark.parametrize("outtype,bound", [("q8_0", 0.02), ("f16", 1e-3), ("bf16", 8e-3)])
def test_quantized_ggufs_run_close_to_f32(gguf_model, hf_llm, tmp_path, outtype, bound):
    out = tmp_path / f"m-{outtype}.gguf"
    assert herd_main(["convert", "-m", str(gguf_model[0]), "-o", str(out), "--outtype", outtype]) == 0
    llm = herd.load(out)
    kld = _kld(hf_llm.logits(IDS), llm.logits(IDS))
    print(f"{outtype}: mean KLD vs F32 {kld:.2e}, file {out.stat().st_size:,} bytes")
    assert kld < bound
    if outtype == "q8_0":
        from herd.quant.qtensor import QTensor

        assert isinstance(llm.model.model.layers[0].feed_forward.experts.gate_proj, QTensor)
        assert isinstance(llm.model.model.embed_tokens.weight, QTensor)


def test_q4_0_plan_runs(gguf_model, hf_llm, tmp_path):
    config = hf_llm.config
    qtypes = {"model.layers.0.feed_forward.experts.gate_proj": 2, "model.layers.1.self_attn.q_proj.weight": 2}
    out = tmp_path / "mixed.gguf"
    write_gguf(out, config, hf_tensor_getter(gguf_model[0], config), checkpoint_vocab(gguf_model[0]), qtypes=qtypes, progress=False)
    llm = herd.load(out)
    assert llm.model.model.layers[0].feed_forward.experts.gate_proj.qtype == 2
    assert _kld(hf_llm.logits(IDS), llm.logits(IDS)) < 0.05


def test_split_gguf_loads_from_first_part(gguf_model, hf_llm, tmp_path):
    config = hf_llm.config
    parts = write_gguf(tmp_path / "split.gguf", config, hf_tensor_getter(gguf_model[0], config),
                       checkpoint_vocab(gguf_model[0]), split_max_tensors=20, progress=False)
    assert [p.name for p in parts] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    llm = herd.load(parts[0])
    assert (llm.logits(IDS) - hf_llm.logits(IDS)).abs().max().item() <= 1e-5
    parts[2].unlink()
    with pytest.raises(herd.FormatError, match="split-00003-of-00003.gguf.*missing"):
        herd.load(parts[0])


def test_info_on_gguf(gguf_model, capsys):
    assert herd_main(["info", str(gguf_model[1])]) == 0
    out = capsys.readouterr().out
    assert "tensors: 55" in out and "tokenizer.ggml.tokens" in out and "[202048 items]" in out


# ---------------------------------------------------------------------------------------------- malformed


def _copy(gguf_model, tmp_path, name="bad.gguf"):
    dst = tmp_path / name
    shutil.copy(gguf_model[1], dst)
    return dst


def _expect_error(path, *fragments):
    with pytest.raises(herd.HerdError) as info:
        herd.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path.name) in msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_file(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p)


def test_wrong_magic(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    data = bytearray(p.read_bytes())
    data[:4] = b"GGML"
    p.write_bytes(bytes(data))
    _expect_error(p, "not a valid GGUF file")


def _patch(path, marker: bytes, skip: int, new: bytes):
    """Overwrite bytes right after the first occurrence of `marker` in the header (plus `skip` bytes)."""
    data = bytearray(path.read_bytes())
    i = data.index(marker) + len(marker) + skip
    data[i : i + len(new)] = new
    path.write_bytes(bytes(data))


def test_unknown_type_id(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    _patch(p, b"blk.0.attn_q.weight", 4 + 2 * 8, (77).to_bytes(4, "little"))
    _expect_error(p, "unknown tensor type 77")


def test_tensor_data_past_end_of_file(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    _patch(p, (13).to_bytes(8, "little") + b"output.weight", 4 + 2 * 8 + 4, (1 << 40).to_bytes(8, "little"))
    _expect_error(p, "tensor output.weight data ends at byte", "past the end of the file")


def test_metadata_with_wrong_value_type(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    _patch(p, b"llama4.block_count", 0, (6).to_bytes(4, "little"))  # declared f32 instead of u32
    _expect_error(p, "llama4.block_count", "expected an integer")


def test_unknown_metadata_value_type(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    _patch(p, b"llama4.expert_count", 0, (42).to_bytes(4, "little"))
    _expect_error(p, "unknown metadata value type 42")


def test_not_llama4(gguf_model, tmp_path):
    p = _copy(gguf_model, tmp_path)
    _patch(p, b"general.architecture", 4 + 8, b"llama2")
    _expect_error(p, "general.architecture = 'llama2'", "expected 'llama4'")


def test_convert_writes_nothing_on_failure(gguf_model, tmp_path):
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(gguf_model[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out.gguf"
    assert herd_main(["convert", "-m", str(bad), "-o", str(out)]) == 1
    assert not out.exists() and not any(tmp_path.glob(".out.gguf*"))

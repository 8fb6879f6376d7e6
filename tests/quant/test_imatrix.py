"""Importance matrix: Σx² per input column equals transformers' activations (experts: the router-scaled
input, per expert), files round-trip in llama.cpp's GGUF and legacy formats, and weighting by it lowers the
weighted error of K/IQ quantization."""

import numpy as np
import pytest
import torch

import herd
from herd.cli.main import main
from herd.quant import formats
from herd.quant.imatrix import collect_imatrix, read_imatrix


@pytest.fixture(scope="module")
def collected(quant_model):
    llm = herd.load(quant_model, dtype="f32")
    torch.manual_seed(0)
    chunks = [torch.randint(0, 270, (32,)).tolist() for _ in range(3)]
    return llm, chunks, collect_imatrix(llm, chunks, progress=False, dataset="random")


def test_sums_equal_transformers_activations(quant_model, collected):
    from transformers import Llama4ForCausalLM

    _, chunks, im = collected
    hf = Llama4ForCausalLM.from_pretrained(quant_model, torch_dtype=torch.float32).eval()
    seen = {}

    def keep(name):
        def hook(_m, inputs):
            seen.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
        return hook

    layer = hf.model.layers[1]
    layer.self_attn.q_proj.register_forward_pre_hook(keep("q"))
    layer.feed_forward.experts.register_forward_pre_hook(keep("experts"))
    layer.feed_forward.shared_expert.down_proj.register_forward_pre_hook(keep("shexp_down"))
    with torch.no_grad():
        for c in chunks:
            hf(torch.tensor([c]))
    q = torch.cat(seen["q"])
    e = im.entries["blk.1.attn_q.weight"]
    np.testing.assert_allclose(e.sum2[0], (q * q).sum(0).numpy(), rtol=1e-4)
    assert e.counts.tolist() == [96.0]
    # HF runs every expert on router-scaled inputs (zero where not routed): [E * T, H] per call
    routed = torch.cat([x.reshape(4, -1, 256) for x in seen["experts"]], dim=1)
    want = (routed * routed).sum(1).numpy()
    got = im.entries["blk.1.ffn_gate_exps.weight"]
    np.testing.assert_allclose(got.sum2, want, rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(got.sum2, im.entries["blk.1.ffn_up_exps.weight"].sum2)
    assert got.counts.sum() == 96 and got.sum2.shape == (4, 256)
    d = torch.cat(seen["shexp_down"])
    np.testing.assert_allclose(im.entries["blk.1.ffn_down_shexp.weight"].sum2[0], (d * d).sum(0).numpy(), rtol=1e-4)
    assert "output.weight" not in im.entries and "token_embd.weight" not in im.entries


def test_gguf_file_round_trip_and_layout(collected, tmp_path):
    import gguf

    _, _, im = collected
    path = im.save(tmp_path / "imatrix.gguf")
    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(fields)
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [256, 4]  # ggml order {ne0, n_mat}
    assert list(tensors["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 4]
    back = read_imatrix(path)
    assert back.datasets == ["random"] and back.chunk_count == 3 and back.chunk_size == 32
    for name, e in im.entries.items():
        np.testing.assert_allclose(back.entries[name].sum2, e.sum2, rtol=1e-6)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)


def test_legacy_dat_round_trip_keeps_the_means(collected, tmp_path):
    _, _, im = collected
    back = read_imatrix(im.save(tmp_path / "imatrix.dat"), num_experts=4)
    want, got = im.importance(), back.importance()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)
    assert got["model.layers.0.feed_forward.experts.down_proj"].shape == (4, 256)


def test_importance_shapes_feed_the_writer(collected):
    _, _, im = collected
    imp = im.importance()
    assert imp["model.layers.0.self_attn.q_proj.weight"].shape == (256,)
    assert imp["model.layers.1.feed_forward.experts.gate_proj"].shape == (4, 256)


def test_cli_writes_an_imatrix(quant_model, sample_text, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(sample_text)
    out = tmp_path / "im.gguf"
    assert main(["imatrix", "-m", str(quant_model), "-f", str(text), "-o", str(out), "-c", "64", "--chunks", "2"]) == 0
    im = read_imatrix(out)
    assert im.chunk_count == 2 and im.entries["blk.0.attn_v.weight"].counts.tolist() == [128.0]


def test_bad_imatrix_files(tmp_path):
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x05\x00\x00\x00\x03")
    with pytest.raises(herd.HerdError, match="x.dat"):
        read_imatrix(bad)
    with pytest.raises(herd.HerdError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q5_1"])
def test_importance_lowers_the_weighted_error(qtype):
    """Activations with a few loud columns (as real ones have): weighting by Σx² must pay off."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g)
    importance = torch.rand(512, generator=g) ** 4 + 1e-3
    importance[torch.randperm(512, generator=g)[:16]] *= 100.0

    def weighted_error(imp):
        q = formats.quantize(w, qtype, importance=imp)
        return float((importance * (formats.dequantize(q, qtype, w.shape) - w) ** 2).sum())

    assert weighted_error(importance) < 0.9 * weighted_error(None)


def test_expert_stack_uses_each_experts_importance():
    from herd.quant.qtensor import QTensor

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 8, 256, generator=g)
    imp = torch.rand(3, 256, generator=g) + 0.01
    stack = QTensor.quantize(w, "Q4_K", imp)
    for e in range(3):
        one = formats.quantize(w[e], "Q4_K", importance=imp[e])
        assert torch.equal(stack.data[e * 8:(e + 1) * 8], one)

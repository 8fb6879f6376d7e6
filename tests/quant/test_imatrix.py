"""Importance matrix: Σx² per input column equals sums computed by hand from transformers' activations on the
same checkpoint (experts: the router-scaled input, per expert; down: silu(gate)·up), files round-trip in
llama.cpp's GGUF and legacy formats with llama.cpp's rules for unseen experts, and weighting by it lowers the
weighted error of K/IQ quantization."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import herd
from herd.cli.main import main
from herd.quant import formats
from herd.quant.imatrix import Entry, Imatrix, collect_imatrix, read_imatrix

E, H, I = 4, 256, 256  # the quant_model fixture: experts, hidden, expert width


def _chunks():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 270, (32,), generator=g).tolist() for _ in range(3)]


@pytest.fixture(scope="module")
def collected(quant_model):
    llm = herd.load(quant_model, dtype="f32")
    return llm, _chunks(), collect_imatrix(llm, _chunks(), progress=False, dataset="random.txt")


@pytest.fixture(scope="module")
def hf_inputs(quant_model):
    """Inputs of layer 1's matmuls in transformers' Llama4ForCausalLM over the same chunks, [rows, in] each."""
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(quant_model, dtype=torch.float32).eval()
    seen = {}

    def keep(name):
        def hook(_m, inputs):
            seen.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
        return hook

    layer = hf.model.layers[1]
    layer.self_attn.q_proj.register_forward_pre_hook(keep("q"))
    layer.self_attn.o_proj.register_forward_pre_hook(keep("o"))
    layer.feed_forward.router.register_forward_pre_hook(keep("router"))
    layer.feed_forward.experts.register_forward_pre_hook(keep("experts"))
    layer.feed_forward.shared_expert.down_proj.register_forward_pre_hook(keep("shexp_down"))
    with torch.no_grad():
        for c in _chunks():
            hf(torch.tensor([c]))
    out = {k: torch.cat(v) for k, v in seen.items() if k != "experts"}
    # HF runs every expert on router-scaled inputs, zero rows where a token was not routed: [E, rows, H]
    out["experts"] = torch.cat([x.reshape(E, -1, H) for x in seen["experts"]], dim=1)
    out["gate_up"] = layer.feed_forward.experts.gate_up_proj.detach().double()  # [E, H, 2I]
    return out


def _sum2(x):
    return (x * x).sum(-2).numpy()


def test_dense_sums_and_counts_equal_transformers(collected, hf_inputs):
    _, _, im = collected
    for name, key in [("attn_q", "q"), ("attn_output", "o"), ("ffn_gate_inp", "router"), ("ffn_down_shexp", "shexp_down")]:
        e = im.entries[f"blk.1.{name}.weight"]
        np.testing.assert_allclose(e.sum2[0], _sum2(hf_inputs[key]), rtol=1e-5, err_msg=name)
        assert e.counts.tolist() == [96.0] and e.sum2.shape == (1, hf_inputs[key].shape[1])
    assert "output.weight" not in im.entries and "token_embd.weight" not in im.entries


def test_expert_sums_are_per_expert_and_router_scaled(collected, hf_inputs):
    _, _, im = collected
    routed = hf_inputs["experts"]  # [E, rows, H], zeros for tokens not routed to that expert
    gate = im.entries["blk.1.ffn_gate_exps.weight"]
    np.testing.assert_allclose(gate.sum2, _sum2(routed), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(gate.sum2, im.entries["blk.1.ffn_up_exps.weight"].sum2)
    # counts: the tokens routed to each expert (top-1: they add up to the tokens seen)
    assert gate.counts.tolist() == (routed.abs().sum(-1) > 0).sum(-1).double().tolist() and gate.counts.sum() == 96
    g, u = torch.bmm(routed, hf_inputs["gate_up"]).chunk(2, dim=-1)
    down = im.entries["blk.1.ffn_down_exps.weight"]
    np.testing.assert_allclose(down.sum2, _sum2(F.silu(g) * u), rtol=1e-5, atol=1e-9)
    assert down.sum2.shape == (E, I)


def test_fused_expert_path_is_still_collected(quant_model, collected, monkeypatch):
    """If Experts.forward stops calling run_expert (a fused kernel), the hook recomputes the same statistics."""
    from herd.model.moe import Experts, expert_linear

    def fused_forward(self, x, expert_ids, scores):
        out = torch.zeros_like(x)
        for slot in range(expert_ids.shape[1]):
            for e in expert_ids[:, slot].unique().tolist():
                rows = expert_ids[:, slot] == e
                xin = x[rows] * scores[rows, slot, None]
                h = F.silu(expert_linear(xin, self.gate_proj, e)) * expert_linear(xin, self.up_proj, e)
                out[rows] += expert_linear(h, self.down_proj, e)
        return out

    llm, chunks, want = collected
    monkeypatch.setattr(Experts, "forward", fused_forward)
    got = collect_imatrix(llm, chunks, progress=False)
    assert set(got.entries) == set(want.entries)
    for name, e in want.entries.items():
        np.testing.assert_allclose(got.entries[name].sum2, e.sum2, rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(got.entries[name].counts, e.counts)


def test_gguf_file_layout_read_by_gguf_package(collected, tmp_path):
    import gguf

    _, _, im = collected
    path = im.save(tmp_path / "imatrix.gguf")
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed away
    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    assert set(fields) >= {"general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"}
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["random.txt"]
    assert fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (3, 32)
    tensors = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [f"{n}{s}" for n in sorted(im.entries) for s in (".in_sum2", ".counts")]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    assert list(tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [I, E]  # ggml order {ne0, n_mat}
    assert list(tensors["blk.0.ffn_down_exps.weight.counts"].shape) == [1, E]
    assert list(tensors["blk.2.attn_k.weight.in_sum2"].shape) == [H, 1]
    np.testing.assert_allclose(tensors["blk.2.attn_k.weight.in_sum2"].data.reshape(-1),
                               im.entries["blk.2.attn_k.weight"].sum2[0], rtol=1e-6)
    back = read_imatrix(path)
    assert back.datasets == ["random.txt"] and back.chunk_count == 3 and back.chunk_size == 32
    assert back.path == str(path) and set(back.entries) == set(im.entries)
    for name, e in im.entries.items():
        np.testing.assert_allclose(back.entries[name].sum2, e.sum2, rtol=1e-6)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)


@pytest.mark.parametrize("num_experts", [4, None])  # None: inferred from the file's own widths
def test_legacy_dat_round_trip_keeps_the_means(collected, tmp_path, num_experts):
    _, _, im = collected
    back = read_imatrix(im.save(tmp_path / "imatrix.dat"), num_experts=num_experts)
    assert back.chunk_count == 3 and back.datasets == ["random.txt"]
    want, got = im.importance(), back.importance()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)
    assert got["model.layers.0.feed_forward.experts.down_proj"].shape == (E, I)


def test_legacy_layout_by_hand(tmp_path):
    """One entry: i32 n; i32 len, name, i32 ncall, i32 nval, f32 × nval (mean·ncall); i32 chunks, dataset."""
    im = Imatrix({"blk.0.attn_q.weight": Entry(np.array([[8.0, 2.0]]), np.array([4.0])),
                  "blk.0.attn_k.weight": Entry(np.zeros((1, 2)), np.array([0.0]))}, ["c.txt"], 2, 3)
    raw = im.save(tmp_path / "x.dat").read_bytes()
    name = b"blk.0.attn_q.weight"
    want = (np.array([1, len(name)], "<i4").tobytes() + name + np.array([2, 2], "<i4").tobytes()
            + np.array([4.0, 1.0], "<f4").tobytes() + np.array([2, 5], "<i4").tobytes() + b"c.txt")
    assert raw == want  # ncall = ceil(4 / 3) = 2; the entry that saw no rows is left out, as llama-imatrix does


def test_unseen_experts_get_ones_as_in_llama_quantize():
    sums = np.array([[2.0, 4.0], [0.0, 0.0], [3.0, 9.0]])
    im = Imatrix({"blk.0.ffn_up_exps.weight": Entry(sums, np.array([2.0, 0.0, 3.0]))})
    got = im.importance()["model.layers.0.feed_forward.experts.up_proj"]
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 3.0]]))


def test_importance_names_are_the_writers_names(quant_model, collected):
    from herd.weights.gguf_write import is_quantizable, tensor_plan

    llm, _, im = collected
    imp = im.importance()
    plan = dict(tensor_plan(llm.config))
    assert set(imp) <= set(plan)
    quantizable = {n for n, shape in plan.items() if is_quantizable(n, shape) and n.startswith("model.layers.")}
    assert quantizable <= set(imp)  # every block matmul the writer may quantize has its importance
    assert imp["model.layers.0.self_attn.q_proj.weight"].shape == (H,)
    assert imp["model.layers.1.feed_forward.experts.gate_proj"].shape == (E, H)
    assert imp["model.layers.1.feed_forward.experts.gate_proj"].dtype == torch.float32


def test_cli_writes_an_imatrix(quant_model, sample_text, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(sample_text)
    out = tmp_path / "im.gguf"
    assert main(["imatrix", "-m", str(quant_model), "-f", str(text), "-o", str(out), "-c", "64", "--chunks", "2"]) == 0
    im = read_imatrix(out)
    assert im.chunk_count == 2 and im.chunk_size == 64 and im.datasets == [str(text)]
    assert im.entries["blk.0.attn_v.weight"].counts.tolist() == [128.0]
    assert main(["imatrix", "-m", str(quant_model), "-f", str(text), "-o", str(tmp_path / "im.dat"), "-c", "64",
                 "--chunks", "1", "--process-output"]) == 0
    assert "output.weight" in read_imatrix(tmp_path / "im.dat").entries


def test_bad_imatrix_files(tmp_path, capsys):
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x05\x00\x00\x00\x03")
    with pytest.raises(herd.HerdError, match="x.dat"):
        read_imatrix(bad)
    with pytest.raises(herd.HerdError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
    assert main(["imatrix", "-f", str(tmp_path / "none.txt"), "-o", str(tmp_path / "no/dir/im.gguf")]) == 1
    assert "does not exist" in capsys.readouterr().err


def _realistic_importance(n_cols: int, seed: int) -> torch.Tensor:
    """Mean squared activations over 2048 tokens with a few loud columns, as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n_cols, generator=g) * (0.5 + torch.rand(n_cols, generator=g))
    loud = torch.randperm(n_cols, generator=g)[:8]
    x[:, loud] *= 20.0
    im = Imatrix({"blk.0.attn_q.weight": Entry((x.double() ** 2).sum(0, keepdim=True).numpy(), np.array([2048.0]))})
    return im.importance()["model.layers.0.self_attn.q_proj.weight"]


def weighted_errors(qtype: str, seed: int = 1) -> tuple[float, float]:
    """Σ imp·(w − ŵ)² of a random weight quantized without and with the importance."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 512, generator=g) * 0.02
    imp = _realistic_importance(512, seed)

    def err(importance):
        q = formats.quantize(w, qtype, importance=importance)
        return float((imp * (formats.dequantize(q, qtype, w.shape) - w) ** 2).sum())

    return err(None), err(imp)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"])
def test_importance_lowers_the_weighted_error(qtype):
    plain, weighted = weighted_errors(qtype)
    print(f"{qtype}: imatrix-weighted error {plain:.4e} without, {weighted:.4e} with ({weighted / plain:.2f}x)")
    assert weighted < 0.9 * plain


def test_expert_stack_uses_each_experts_importance():
    from herd.quant.qtensor import QTensor

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 8, 256, generator=g)
    imp = torch.rand(3, 256, generator=g) + 0.01
    stack = QTensor.quantize(w, "Q4_K", imp)
    for e in range(3):
        one = formats.quantize(w[e], "Q4_K", importance=imp[e])
        assert torch.equal(stack.data[e * 8:(e + 1) * 8], one)

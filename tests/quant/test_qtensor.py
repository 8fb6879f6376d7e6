"""Quantized weights used in place: every path equals the dense matmul on the decoded weight, touches only
the blocks it needs, and never decodes more than a slab of rows at a time."""

from __future__ import annotations

import pytest
import torch

from herd.quant import formats
from herd.quant.qtensor import QTensor


def _qt(shape, q="Q8_0", seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return QTensor(formats.quantize(x.reshape(-1, shape[-1]), q), q, shape)


@pytest.mark.parametrize("q", ["Q8_0", "Q4_0", "Q4_K"])
def test_linear_equals_dense(monkeypatch, q):
    import herd.quant.qtensor as qmod

    monkeypatch.setattr(qmod, "SLAB_ELEMENTS", 256 * 10)  # force several slabs
    w = _qt((37, 256), q)
    x = torch.randn(3, 5, 256)
    dense = w.dequantize()
    assert dense.shape == (37, 256) and dense.dtype == torch.float32
    assert torch.allclose(w.linear(x), x @ dense.T, atol=1e-4)


def test_bf16_activations_give_bf16_outputs():
    w = _qt((40, 64))
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = w.linear(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), (x.float() @ w.dequantize().T), atol=0.1, rtol=0.02)


def test_linear_decodes_a_slab_at_a_time(monkeypatch):
    import herd.quant.qtensor as qmod

    monkeypatch.setattr(qmod, "SLAB_ELEMENTS", 64 * 8)
    seen = []
    real = formats.dequantize

    def spy(data, qtype, shape):
        seen.append(shape[0])
        return real(data, qtype, shape)

    monkeypatch.setattr(qmod.formats, "dequantize", spy)
    w = _qt((100, 64))
    w.linear(torch.randn(2, 64))
    assert max(seen) == 8 and sum(seen) == 100


def test_expert_linear_touches_only_that_expert():
    w = _qt((4, 16, 64))
    dense = w.dequantize()
    x = torch.randn(7, 64)
    for e in range(4):
        assert torch.allclose(w.expert_linear(x, e), x @ dense[e].T, atol=1e-5)
    # poison every other expert's blocks (scale = NaN): expert 2's output must not notice
    raw = w.data.clone()
    poisoned = QTensor(raw, "Q8_0", (4, 16, 64))
    scales = raw.view(4 * 16, 2, 34)[:, :, 0:2]
    for e in (0, 1, 3):
        scales[e * 16 : (e + 1) * 16] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)
    assert torch.isnan(poisoned.expert_linear(x, 0)).all()
    assert torch.equal(poisoned.expert_linear(x, 2), w.expert_linear(x, 2))
    with pytest.raises(IndexError):
        w.expert_linear(x, 4)


def test_dequantize_rows():
    w = _qt((3, 10, 64))
    full = w.dequantize()
    assert full.shape == (3, 10, 64)
    assert torch.equal(w.dequantize(rows=slice(10, 20)), full[1])
    assert torch.equal(w.dequantize(rows=25), full[2, 5])
    assert torch.equal(w.dequantize(rows=[0, 29]), torch.stack([full[0, 0], full[2, 9]]))
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_take_rows_is_an_embedding_lookup():
    w = _qt((100, 32))
    ids = torch.tensor([[3, 3, 99], [0, 50, 3]])
    assert torch.equal(w.take_rows(ids), torch.nn.functional.embedding(ids, w.dequantize()))


def test_no_copy_of_the_data_and_tensor_like_info():
    raw = formats.quantize(torch.randn(8, 64), "Q8_0")
    w = QTensor(raw, "Q8_0", (8, 64))
    assert w.data.data_ptr() == raw.data_ptr() and w.nbytes == raw.numel() == 8 * 2 * 34
    assert (w.shape, w.ndim, w.numel(), w.size(0), w.type_name, w.dtype) == ((8, 64), 2, 512, 8, "Q8_0", torch.float32)
    assert w.bits_per_weight == 8.5 and w.to("cpu") is w and w.device.type == "cpu"
    q = QTensor.quantize(torch.randn(2, 3, 32), "Q4_0")
    assert q.shape == (2, 3, 32) and q.nbytes == 6 * 18


def test_bad_shapes_are_format_errors():
    from herd.errors import FormatError

    raw = formats.quantize(torch.randn(8, 64), "Q8_0")
    with pytest.raises(FormatError, match="needs 680 bytes"):
        QTensor(raw, "Q8_0", (10, 64))
    with pytest.raises(FormatError, match="not a multiple of 32"):
        QTensor(raw, "Q8_0", (17, 48))
    with pytest.raises(FormatError, match="unknown tensor type"):
        QTensor(raw, 99, (8, 64))


def test_model_layers_accept_qtensors():
    """The model's linear / expert / embedding paths dispatch to QTensor (set with set_weight)."""
    from herd.model.layers import Embedding, Linear, set_weight
    from herd.model.moe import expert_linear

    lin, emb = Linear(64, 40), Embedding(100, 64)
    w, e, stack = _qt((40, 64)), _qt((100, 64), seed=1), _qt((2, 40, 64), seed=2)
    set_weight(lin, "weight", w)
    set_weight(emb, "weight", e)
    x = torch.randn(3, 64)
    assert torch.allclose(lin(x), x @ w.dequantize().T, atol=1e-5)
    assert torch.equal(emb(torch.tensor([1, 7])), e.dequantize()[[1, 7]])
    assert torch.allclose(expert_linear(x, stack, 1), x @ stack.dequantize()[1].T, atol=1e-5)

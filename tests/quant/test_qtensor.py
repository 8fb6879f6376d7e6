"""Quantized weights used in place: every path equals the dense matmul on the decoded weight."""

from __future__ import annotations

import torch

from herd.quant import formats
from herd.quant.qtensor import QTensor


def _qt(shape, q="Q8_0", seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return QTensor(formats.quantize(x, q), q, shape)


def test_linear_equals_dense(monkeypatch):
    import herd.quant.qtensor as qmod

    monkeypatch.setattr(qmod, "SLAB_ELEMENTS", 64 * 10)  # force several slabs
    w = _qt((37, 64), "Q4_0")
    x = torch.randn(3, 5, 64)
    dense = w.dequantize()
    assert torch.allclose(w.linear(x), x @ dense.T, atol=1e-5)


def test_expert_linear_touches_one_expert():
    w = _qt((4, 16, 64))
    dense = w.dequantize()
    x = torch.randn(7, 64)
    for e in range(4):
        assert torch.allclose(w.expert_linear(x, e), x @ dense[e].T, atol=1e-5)


def test_take_rows_is_an_embedding_lookup():
    w = _qt((100, 32))
    ids = torch.tensor([[3, 3, 99], [0, 50, 3]])
    assert torch.equal(w.take_rows(ids), torch.nn.functional.embedding(ids, w.dequantize()))


def test_no_copy_of_the_data():
    raw = formats.quantize(torch.randn(8, 64), "Q8_0")
    w = QTensor(raw, "Q8_0", (8, 64))
    assert w.data.data_ptr() == raw.data_ptr() and w.nbytes == raw.numel()

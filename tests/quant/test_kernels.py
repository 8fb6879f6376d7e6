"""Fast CPU paths for quantized weights (herd.quant.kernels): each path's output against exact dequantization
plus matmul, within the error it states (bit-exact where claimed), for plain linears, expert stacks, the path
selection, and a whole tiny GGUF model with the fast paths on and off. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from herd.quant import formats, kernels
from herd.quant.qtensor import QTensor

INT4 = ["Q4_0", "Q4_1", "Q4_K"]
INT4X2 = ["Q8_0", "Q5_0", "Q5_1", "Q5_K"]
INT8 = ["Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]
# bfloat16 activations, scales and outputs inside the fused kernels: relative error of a 256-long dot product
BF16_REL = 1e-2
# int8 path: the above plus one int8 step per row (requantized)
INT8_REL = 2.5e-2


def _qt(shape, q, seed=0):
    x = 0.05 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return QTensor.quantize(x, q)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("q", INT4 + INT4X2)
def test_affine_parts_decode_exactly(q):
    w = _qt((64, 256), q)
    codes, step, offset = kernels.affine_parts(w.data, w.qtype)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (16 if q in INT4 else 256)
    decoded = (codes.float().view(64, -1, 32) * step[..., None] + offset[..., None]).view(64, 256)
    assert torch.equal(decoded, w.dequantize())


def test_path_selection():
    for q in INT4:
        assert kernels.path_for(q, (64, 256)) == "int4"
    for q in INT4X2:
        assert kernels.path_for(q, (4, 64, 256)) == "int4x2"
    for q in INT8:
        assert kernels.path_for(q, (64, 256)) == "int8"
    assert kernels.path_for("IQ2_XXS", (64, 256)) == "dequant"
    assert kernels.path_for("Q4_K", (48, 256)) == "dequant"  # int4 works on blocks of 32 output rows
    w = _qt((64, 256), "Q4_K")
    assert w._fast_path is None  # a bare QTensor decodes blocks until a path is chosen for it
    assert w.use_fast_path() == "int4" and w._fast_path == "int4"


@pytest.mark.parametrize("q", INT4 + INT4X2 + INT8)
def test_linear_matches_exact_dequantization(q):
    w = _qt((64, 256), q)
    dense = w.dequantize()
    w.use_fast_path()
    small, big = torch.randn(3, 256), torch.randn(2, 10, 256)  # fused kernel / dequantize + GEMM
    bound = INT8_REL if q in INT8 else BF16_REL
    assert _rel(w.linear(small), small @ dense.T) < bound
    y = w.linear(big)
    assert y.shape == (2, 10, 64) and y.dtype == torch.float32
    if q in INT8:
        assert _rel(y, big @ dense.T) < bound
    else:  # large batches expand the exact float32 values: the same result as the dense weight
        assert torch.equal(w._repacked(0).dequantize(), dense)
        assert torch.allclose(y, big @ dense.T, atol=1e-5)


@pytest.mark.parametrize("q", ["Q4_K", "Q8_0", "Q6_K"])
def test_expert_stacks_repack_only_the_used_expert(q):
    w = _qt((4, 64, 256), q)
    dense = w.dequantize()
    w.use_fast_path()
    x = torch.randn(1, 256)
    for e in (2, 0):
        assert _rel(w.expert_linear(x, e), x @ dense[e].T) < INT8_REL
    assert sorted(w._fast) == [0, 2]  # experts 1 and 3 were never repacked
    w.prepare()
    assert sorted(w._fast) == [0, 1, 2, 3]


def test_bfloat16_activations_keep_their_dtype():
    w = _qt((64, 256), "Q4_0")
    w.use_fast_path()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    y = w.linear(x)
    assert y.dtype == torch.bfloat16 and _rel(y, x.float() @ w.dequantize().T) < BF16_REL


def test_switching_off_restores_exact_decoding():
    w = _qt((64, 256), "Q4_K")
    w.use_fast_path()
    x = torch.randn(2, 256)
    try:
        kernels.set_enabled(False)
        assert torch.allclose(w.linear(x), x @ w.dequantize().T, atol=1e-5)
        assert not w._fast
    finally:
        kernels.set_enabled(True)


@pytest.fixture(scope="module")
def tiny_gguf(quant_model, tmp_path_factory):
    """The quantization tests' tiny model (widths 256, 4 experts) as a GGUF with one type per fast path."""
    import herd
    from herd.weights.gguf_write import hf_tensor_getter, is_quantizable, tensor_plan, write_gguf

    config = herd.load(quant_model).config
    types = {}
    for name, shape in tensor_plan(config):
        if is_quantizable(name, shape):
            types[name] = "Q8_0" if "self_attn" in name else ("Q6_K" if "down" in name else "Q4_K")
    path = tmp_path_factory.mktemp("kernels") / "mixed.gguf"
    write_gguf(path, config, hf_tensor_getter(quant_model, config), quant_model, qtypes=types, progress=False)
    return path


def test_model_logits_with_fast_paths_on_and_off(tiny_gguf):
    import herd

    ids = torch.tensor([[5, 17, 99, 3]])
    try:
        kernels.set_enabled(False)
        exact = herd.load(tiny_gguf).logits(ids)
    finally:
        kernels.set_enabled(True)
    llm = herd.load(tiny_gguf)
    paths = {w._fast_path for m in llm.model.modules() for w in vars(m).values() if isinstance(w, QTensor)}
    assert {"int4", "int4x2", "int8"} <= paths
    fast = llm.logits(ids)
    kld = torch.nn.functional.kl_div(fast.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1).mean().item()
    assert kld < 1e-3 and (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75

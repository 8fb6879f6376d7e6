"""herd's own Q4_K / Q6_K kernels (quant/native.py, csrc/kquant.cpp) against exact arithmetic: the input
rounded per 256 values to int8 (as llama.cpp's Q8_K), the GGUF codes and scales exactly as stored."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from herd.quant import formats, kernels, native
from herd.quant.qtensor import QTensor

TYPES = ["Q4_K", "Q6_K"]


def _blocks(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2.0, k)  # uneven columns: scales differ per block
    blocks = formats.quantize(w, qtype).reshape(n, -1)
    return blocks, formats.dequantize(blocks, qtype, (n, k))


def _q8k(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels round their input: int8 per 256 values, scale max|x| / 127."""
    xs = x.double().view(x.shape[0], -1, 256)
    amax = xs.abs().amax(-1, keepdim=True)
    return (torch.round(xs * (127 / amax)) * (amax / 127)).view_as(x)


def test_kernels_build_and_load():
    """A silent fall-back to the int8 path would hide a broken build: on Linux with a compiler it must load."""
    assert native.available(), "the K-quant kernels did not build (see the warning)"


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_product_is_exact_integer_arithmetic(qtype, m):
    """Every sub-block sum is exact in int32; only the float32 steps per super-block round."""
    n, k = 48, 768
    blocks, w = _blocks(qtype, n, k)
    weight = native.KQuantWeight.build(blocks, qtype, (n, k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = _q8k(x) @ w.double().T
    got = weight.linear(x)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # against the unrounded input: the error of rounding x to int8 per 256 values, small next to the type's own
    exact = x.double() @ w.double().T
    assert ((got.double() - exact).norm() / exact.norm()).item() < 0.01


@pytest.mark.parametrize("qtype", TYPES)
def test_bfloat16_input_and_leading_dims(qtype):
    blocks, w = _blocks(qtype, 32, 256, seed=3)
    weight = native.KQuantWeight.build(blocks, qtype, (32, 256))
    x = torch.randn(2, 3, 256).bfloat16()
    y = weight.linear(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    want = (_q8k(x.float().view(6, 256)) @ w.double().T).view(2, 3, 32)
    assert torch.allclose(y.double(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


def test_fused_parts_share_one_matrix_and_expert_pick():
    """Fused parts are slices of the fused matrix (no second copy) and give the same products; a handle
    holding one matrix per expert multiplies the one the expert tensor names."""
    parts = [native.KQuantWeight.build(_blocks("Q4_K", n, 512, seed=n)[0], "Q4_K", (n, 512)) for n in (32, 16, 48)]
    x = torch.randn(2, 512)
    alone = [p.linear(x) for p in parts]
    fused = native.KQuantWeight.fuse(parts)
    assert fused.shape == (96, 512)
    assert torch.equal(fused.linear(x), torch.cat(alone, dim=-1))
    for p, y in zip(parts, alone):
        assert p.blob.untyped_storage().data_ptr() == fused.blob.untyped_storage().data_ptr()
        assert torch.equal(p.linear(x), y)
    experts = [native.KQuantWeight.build(_blocks("Q6_K", 16, 256, seed=e)[0], "Q6_K", (16, 256)) for e in range(3)]
    handle = native.register([e.blob for e in experts], "Q6_K", (16, 256))
    x = torch.randn(2, 256)
    for e in range(3):
        assert torch.equal(native.product(x, handle, torch.tensor([[e]])), experts[e].linear(x))
    with pytest.raises(RuntimeError, match="expert 3 out of range"):
        native.product(x, handle, torch.tensor([3]))


def test_shapes_the_kernels_take():
    assert native.supports("Q4_K", (64, 512)) and native.supports("Q6_K", (4, 16, 256))
    assert not native.supports("Q4_K", (40, 256))  # rows: blocks of 16
    assert not native.supports("Q5_K", (64, 256))


def test_qtensor_routes_q4k_and_q6k_through_the_kernels():
    """On a CPU with AVX512-VNNI, a QTensor of these types multiplies through the kernels, within the
    stated error of exact dequantization."""
    if not (kernels.has_int8_dot() and native.vectorized()):
        pytest.skip("kernels built without AVX512-VNNI: herd keeps the int8 path (covered in test_kernels)")
    for qtype in TYPES:
        blocks, w = _blocks(qtype, 64, 512, seed=7)
        q = QTensor(blocks, qtype, (64, 512))
        assert q.use_fast_path() == "kquant"
        x = torch.randn(5, 512)
        assert torch.allclose(q.linear(x).double(), _q8k(x) @ w.double().T, rtol=1e-5, atol=1e-4)


def test_plain_loops_give_the_same_results(tmp_path):
    """The build for CPUs without AVX512-VNNI (plain loops) computes the very same integer sums: built here
    with those instructions turned off, in a process of its own, it gives identical outputs."""
    script = f"""
import torch, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from herd.quant import native
assert native.available() and not native.vectorized()
from test_native_kquant import _blocks
for qtype in ("Q4_K", "Q6_K"):
    blocks, _ = _blocks(qtype, 32, 512, seed=5)
    w = native.KQuantWeight.build(blocks, qtype, (32, 512))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    torch.save(w.linear(x), {str(tmp_path)!r} + f"/{{qtype}}.pt")
"""
    env = dict(os.environ, HERD_CACHE_DIR=str(tmp_path / "cache"), HERD_KQUANT_FLAGS="-mno-avx512vnni")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if not native.vectorized():
        pytest.skip("this CPU has no AVX512-VNNI: both builds are the plain loops")
    for qtype in TYPES:
        blocks, _ = _blocks(qtype, 32, 512, seed=5)
        w = native.KQuantWeight.build(blocks, qtype, (32, 512))
        x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
        plain = torch.load(tmp_path / f"{qtype}.pt", weights_only=True)
        assert torch.allclose(w.linear(x), plain, rtol=1e-6, atol=1e-6)

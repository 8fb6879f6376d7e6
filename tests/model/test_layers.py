"""Building blocks against their written-out definitions."""

import pytest
import torch

from herd.model.layers import rms_norm


@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 1, 10, 128), (2, 37, 1024), (1, 300, 5120)])
def test_bf16_rms_norm_is_fp32_math_rounded_once(shape):
    """The fused norm on bfloat16 input gives exactly x * rsqrt(mean(x^2) + eps) in fp32, cast to bfloat16
    (what both references compute)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1])).bfloat16()
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    got = rms_norm(x, 1e-5)
    assert got.dtype == torch.bfloat16
    # one bf16 step at most where fp32 rounding of the written-out form and the fused kernel differ
    diff = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
    assert float(diff.max()) <= 2 ** -7
    assert torch.equal(got, rms_norm(x.float(), 1e-5).bfloat16())

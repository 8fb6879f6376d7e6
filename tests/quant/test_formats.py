"""Block codecs against gguf-py's port of llama.cpp's reference (de)quantizers."""

from __future__ import annotations

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch

from herd import FormatError
from herd.quant import formats
from herd.quant.formats import FORMATS, QType

DECODE_TYPES = [q for q in QType if q != QType.F32]


def _random_blocks(q: QType, n: int = 96, seed: int = 0) -> np.ndarray:
    """Random block bytes whose decoded values are all finite (fp16 scale fields that are inf/NaN dropped)."""
    f = FORMATS[q]
    rng = np.random.default_rng(seed + int(q))
    raw = rng.integers(0, 256, size=(n, f.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw.copy(), gguf.GGMLQuantizationType(int(q)))
    keep = np.isfinite(ref.reshape(n, -1)).all(axis=-1)
    return raw[keep]


@pytest.mark.parametrize("q", DECODE_TYPES, ids=lambda q: q.name)
def test_decode_bit_exact(q):
    raw = _random_blocks(q)
    assert raw.shape[0] > 40
    with np.errstate(all="ignore"):
        want = gq.dequantize(raw.copy(), gguf.GGMLQuantizationType(int(q))).astype(np.float32).reshape(raw.shape[0], -1)
    got = formats.dequantize(raw, q, want.shape).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 256)).astype(np.float32)
    x[0] = 0.0  # all-zero rows
    x[1] = 3.0  # constant rows
    x[2, 7] = 250.0  # an outlier
    x[3] = rng.standard_normal(256).astype(np.float32) * 1e-6
    x[4, ::2] = -x[4, 1::2]
    return x


@pytest.mark.parametrize("q", [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.F16, QType.BF16],
                         ids=lambda q: q.name)
def test_encode_bit_exact(q):
    x = _data()
    want = np.asarray(gq.quantize(x, gguf.GGMLQuantizationType(int(q)))).view(np.uint8).reshape(x.shape[0], -1)
    got = formats.quantize(torch.from_numpy(x), q).numpy()
    assert np.array_equal(got, want)
    # and the round trip is within the format's step
    back = formats.dequantize(got, q, x.shape).numpy()
    assert np.isfinite(back).all()


def test_table_and_errors():
    assert FORMATS[QType.Q4_K].block_size == 256 and FORMATS[QType.Q4_K].type_size == 144
    assert formats.format_of("q4_k").qtype == QType.Q4_K and formats.format_of(14).name == "Q6_K"
    assert formats.bits_per_weight("Q8_0") == 8.5
    with pytest.raises(FormatError, match="unknown tensor type 'Q9_K'"):
        formats.format_of("Q9_K")
    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        formats.quantize(torch.zeros(2, 48), "Q8_0")
    with pytest.raises(FormatError, match="Q4_K: encoding is not implemented yet"):
        formats.quantize(torch.zeros(2, 256), "Q4_K")
    with pytest.raises(FormatError, match="expected 34"):
        formats.dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))

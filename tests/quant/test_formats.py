"""Block codecs checked against outside references.

* decode: every type, bit for bit against gguf-py's numpy port of ggml's ``dequantize_row_*``;
* encode: the types gguf-py can quantize, byte for byte against ``gguf.quants.quantize``;
  the K-quants / IQ4 (which gguf-py cannot encode) against digests of ggml's own bytes
  (``ggml_quantize_chunk`` of llama.cpp's ggml 0.25.3, via llama-cpp-python 0.3.36; the live
  comparison is ``test_formats_llamacpp.py``), plus round-trip error bounds and the effect of an
  importance vector.
"""

from __future__ import annotations

import hashlib

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch

from herd.errors import FormatError
from herd.quant import formats
from herd.quant.formats import FORMATS, QType

ALL_TYPES = list(QType)
ENCODE_TYPES = [q for q in QType if FORMATS[q].can_encode]
GGUF_ENCODES = [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
KQ_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS]

# byte offsets of the fp16 scale fields of each block (the rest of a block is any bits)
FP16_FIELDS = {
    QType.Q4_0: [0], QType.Q4_1: [0, 2], QType.Q5_0: [0], QType.Q5_1: [0, 2], QType.Q8_0: [0],
    QType.Q2_K: [80, 82], QType.Q3_K: [108], QType.Q4_K: [0, 2], QType.Q5_K: [0, 2], QType.Q6_K: [208],
    QType.IQ2_XXS: [0], QType.IQ2_XS: [0], QType.IQ3_XXS: [0], QType.IQ1_S: [0], QType.IQ4_NL: [0],
    QType.IQ3_S: [0], QType.IQ2_S: [0], QType.IQ4_XS: [0], QType.TQ1_0: [52], QType.TQ2_0: [64],
}


def _gguf_type(q: QType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(int(q))


def _finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp16 bit patterns over the whole finite range (zeros and subnormals included)."""
    h = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    inf_nan = (h & 0x7C00) == 0x7C00
    return np.where(inf_nan, h & ~np.uint16(0x4000), h).astype(np.uint16)


def _random_blocks(q: QType, n: int = 64, seed: int = 0) -> np.ndarray:
    """n random blocks of type q as uint8 [n, type_size]: random bytes, fp16 scale fields random finite."""
    f = FORMATS[q]
    rng = np.random.default_rng(1000 + int(q) + seed)
    raw = rng.integers(0, 256, size=(n, f.type_size), dtype=np.uint8)
    if q == QType.F32:
        v = rng.standard_normal(n * f.block_size) * np.exp2(rng.integers(-60, 60, n * f.block_size))
        return v.astype(np.float32).view(np.uint8).reshape(n, -1)
    if q == QType.F16:
        return _finite_f16_bits(rng, n).view(np.uint8).reshape(n, -1)
    if q == QType.BF16:
        b = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        b = np.where((b & 0x7F80) == 0x7F80, b & ~np.uint16(0x4000), b).astype(np.uint16)
        return b.view(np.uint8).reshape(n, -1)
    if q == QType.IQ1_M:  # the fp16 super-scale is the top nibble of each of the 4 u16 scale words
        h = _finite_f16_bits(rng, n).astype(np.uint16)
        for k in range(4):
            byte = 48 + 2 * k + 1
            raw[:, byte] = (raw[:, byte] & 0x0F) | (((h >> (4 * k)) & 0x0F) << 4).astype(np.uint8)
        return raw
    for off in FP16_FIELDS[q]:
        raw[:, off:off + 2] = _finite_f16_bits(rng, n).view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("q", ALL_TYPES, ids=lambda q: q.name)
def test_decode_bit_exact(q):
    raw = _random_blocks(q)
    f = FORMATS[q]
    with np.errstate(all="ignore"):
        want = np.asarray(gq.dequantize(raw.copy(), _gguf_type(q)), dtype=np.float32).reshape(raw.shape[0], f.block_size)
    assert np.isfinite(want).all()
    got = formats.dequantize(torch.from_numpy(raw), q, want.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    # rows are independent: 4 rows of 16 blocks, from bytes and from numpy, give the same values
    shape = (4, 16 * f.block_size)
    assert np.array_equal(formats.dequantize(raw.tobytes(), q, shape).numpy().reshape(want.shape).view(np.uint32),
                          want.view(np.uint32))
    assert np.array_equal(formats.dequantize(raw.reshape(4, -1), q, shape).numpy().reshape(want.shape),
                          want)


def _legacy_data() -> np.ndarray:
    """Rows of 256 in the shapes that trip quantizers: zeros, constants, outliers, ties, tiny and huge values."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    x[0] = 0.0
    x[1] = 3.0
    x[2] = -0.75
    x[3, 7] = 250.0
    x[3, 100] = -1e3
    x[4] *= 1e-6
    x[5] *= 3e4
    x[6] = np.round(x[6] * 8) / 8  # many exact ties after scaling
    x[7, ::2] = -x[7, 1::2]
    x[8] = np.abs(x[8])
    x[9] = -np.abs(x[9])
    x[10] = rng.standard_t(2, 256)
    x[11] = rng.uniform(-1, 1, 256)
    x[12, :40] = 0.0
    x[13] = np.float32(1e-42) * rng.integers(-8, 8, 256)  # subnormal float32
    x[14] *= 1e5  # overflows fp16
    x[15] = rng.laplace(size=256)
    return x.astype(np.float32)


@pytest.mark.parametrize("q", GGUF_ENCODES, ids=lambda q: q.name)
def test_encode_bit_exact_vs_gguf(q):
    x = _legacy_data()
    with np.errstate(all="ignore"):
        want = np.asarray(gq.quantize(x, _gguf_type(q))).view(np.uint8).reshape(x.shape[0], -1)
    got = formats.quantize(torch.from_numpy(x), q)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (16, formats.bytes_for(q, 256))
    assert np.array_equal(got.numpy(), want)


# --- K-quants / IQ4 against ggml's bytes ----------------------------------------------------------------


def kquant_data() -> tuple[np.ndarray, np.ndarray]:
    """16 rows of 512 in assorted distributions, and an importance vector (also used by the llamacpp test)."""
    rng = np.random.default_rng(20240405)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    x[0] = 0.0
    x[1] = 3.0
    x[2, 7] = 250.0
    x[3] *= 1e-6
    x[4, ::2] = -x[4, 1::2]
    x[5] = np.abs(x[5])
    x[6] = -np.abs(x[6])
    x[7] = rng.standard_t(2, 512)
    x[8] = rng.uniform(-1, 1, 512)
    x[9] = np.round(x[9] * 4) / 4
    x[10, :48] = 0.0
    x[11] *= 1e4
    x[12] = rng.laplace(size=512)
    x[13, 256:] = 0.02 * x[13, 256:]
    x[14] = np.where(rng.random(512) < 0.9, 0.0, x[14])
    x[15] = rng.standard_normal(512) * np.repeat(rng.uniform(0.01, 3, 32), 16)
    imp = (rng.exponential(size=512) ** 2).astype(np.float32)
    imp[:16] = 0.0
    return x.astype(np.float32), imp


# sha256 of ggml_quantize_chunk's output on kquant_data() (ggml 0.25.3 from llama-cpp-python 0.3.36):
# without importance (the quantize_row_*_ref path) and with it (the quant_weights path)
GGML_DIGESTS = {
    ("Q2_K", False): "dc48f6fe6b40912650f7660ab26261881a1c40899cc509302fc4480e8d1e3e6d",
    ("Q2_K", True): "b0bd862bab509583bd099d4fda0babd4f43e0a0242510f1a744841940e06d38a",
    ("Q3_K", False): "a574a4c663d73e4d531cbb343b83797bb03bb46781b4bc96388129a17ef98439",
    ("Q3_K", True): "cf834b1383d2650b8f51686e3aed6c9de4c9334fef4d492ab5ae1d8c745aa11e",
    ("Q4_K", False): "06b5813243a0a940e7e63ca887d1e57611345f980edfed1dca41edfc73e2b213",
    ("Q4_K", True): "9e2f012d2ce9a2404d588e701de204b0ea487b1dd0a02a64c9c622a51b536518",
    ("Q5_K", False): "3b4275ad7faa0d6187c001668a2dcff02719cc19ba7e68a73b0519c4046b86ab",
    ("Q5_K", True): "ee322f0fa6fb2786e77bfa9752939ebc7fb5a0ac12de018faefc238a68fab3d1",
    ("Q6_K", False): "d9a30ac36cc7675fb06f5749e4de88f8446c59d8a43a6e716cab14d9fcf70397",
    ("Q6_K", True): "ac15e82358b36e8ddf1473433b040647d58ad5c0b8f62dd663df8a24ed872eed",
    ("IQ4_NL", False): "84bb6a348e1f8b6860530f1409b95f0367f940714cccc1645d9e600ab7b3c3f3",
    ("IQ4_NL", True): "500b783945ea801ac4618ae34e1129a260b12ffbcf76e6e72134a040414e449b",
    ("IQ4_XS", False): "82c623da846dba1f8215711fd0047ca0c9eb2aa5dc6842b9c36ea9466e58add9",
    ("IQ4_XS", True): "368d4208251a6c6894bc1cbc30b0205b635e81fe2f4f72e2576540df0f48ad2f",
}


@pytest.mark.parametrize("q", KQ_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("with_imp", [False, True], ids=["ref", "imatrix"])
def test_encode_matches_ggml_digest(q, with_imp):
    x, imp = kquant_data()
    got = formats.quantize(torch.from_numpy(x), q, torch.from_numpy(imp) if with_imp else None).numpy()
    assert got.shape == (16, formats.bytes_for(q, 512))
    assert hashlib.sha256(got.tobytes()).hexdigest() == GGML_DIGESTS[(q.name, with_imp)]


# --- round trip ---------------------------------------------------------------------------------------

# (levels, symmetric, group) per type. The bound on the relative RMS error of a Gaussian row is
# 1.25 x the uniform-quantizer noise step/sqrt(12), where step = span / (levels - 1) for types with a
# min (span = mean max - min of a group) and 2 * amax / levels for symmetric ones (mean |x| max of a group).
# IQ4's 16 non-uniform levels span [-127, 113] / 127 * amax: counted as 16 symmetric levels.
LEVELS = {
    QType.Q8_0: (255, True, 32), QType.Q4_0: (16, True, 32), QType.Q5_0: (32, True, 32),
    QType.Q4_1: (16, False, 32), QType.Q5_1: (32, False, 32), QType.Q2_K: (4, False, 16),
    QType.Q3_K: (8, True, 16), QType.Q4_K: (16, False, 32), QType.Q5_K: (32, False, 32),
    QType.Q6_K: (64, True, 16), QType.IQ4_NL: (16, True, 32), QType.IQ4_XS: (16, True, 32),
}


def _gauss(rows: int = 32, cols: int = 1024, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", list(LEVELS), ids=lambda q: q.name)
def test_round_trip_error_bound(q):
    x = _gauss()
    levels, sym, group = LEVELS[q]
    g = x.reshape(-1, group)
    step = (2 * g.abs().amax(-1).mean() / levels) if sym else ((g.amax(-1) - g.amin(-1)).mean() / (levels - 1))
    bound = 1.25 * float(step) / 12 ** 0.5
    y = formats.dequantize(formats.quantize(x, q), q, x.shape)
    rel = float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    assert rel < bound, (rel, bound)
    assert rel > 0.3 * bound  # the bound is not vacuous


@pytest.mark.parametrize("q", [QType.F16, QType.BF16, QType.F32], ids=lambda q: q.name)
def test_float_round_trip(q):
    x = _gauss(4, 256)
    y = formats.dequantize(formats.quantize(x, q), q, x.shape)
    rel = {QType.F32: 0.0, QType.F16: 2.0 ** -11, QType.BF16: 2.0 ** -8}[q]
    assert torch.all((y - x).abs() <= rel * x.abs())


@pytest.mark.parametrize("q", ENCODE_TYPES, ids=lambda q: q.name)
def test_zero_and_constant_rows(q):
    f = FORMATS[q]
    x = torch.zeros(3, 2 * f.block_size)
    x[1] = -2.5
    y = formats.dequantize(formats.quantize(x, q), q, x.shape)
    assert torch.equal(y[0], x[0])
    assert torch.allclose(y[1], x[1], rtol=0.05)


IMATRIX_TYPES = [q for q in LEVELS if q != QType.Q8_0]  # Q8_0 ignores importance in llama.cpp too


@pytest.mark.parametrize("q", IMATRIX_TYPES, ids=lambda q: q.name)
def test_importance_lowers_weighted_error(q):
    x = _gauss(16, 1024, seed=5)
    imp = torch.rand(1024, generator=torch.Generator().manual_seed(6)) ** 4 * 100

    def werr(b):
        return float((imp * (formats.dequantize(b, q, x.shape) - x) ** 2).sum())

    plain, weighted = werr(formats.quantize(x, q)), werr(formats.quantize(x, q, importance=imp))
    assert weighted < 0.9 * plain, (weighted, plain)


# --- table, shapes, errors ----------------------------------------------------------------------------


def test_table_matches_gguf():
    assert {q.name for q in QType} <= {t.name for t in gguf.GGMLQuantizationType}
    for q, f in FORMATS.items():
        assert int(gguf.GGMLQuantizationType[q.name]) == int(q)
        assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[_gguf_type(q)]
        assert f.qtype is q and f.name == q.name
    assert {q for q in QType if FORMATS[q].can_encode} == set(ENCODE_TYPES) and len(ENCODE_TYPES) == 15
    assert FORMATS[QType.IQ2_XXS].needs_imatrix and not FORMATS[QType.Q4_K].needs_imatrix


def test_lookups_and_sizes():
    assert formats.format_of("q4_k").qtype == QType.Q4_K
    assert formats.format_of("Q6_K") is FORMATS[QType.Q6_K]
    assert formats.format_of(14).name == "Q6_K" and formats.format_of(QType.IQ1_M).block_size == 256
    assert formats.bits_per_weight("Q8_0") == 8.5 and formats.bits_per_weight(QType.Q4_K) == 4.5
    assert formats.bytes_for("Q4_K", 4096 * 256) == 4096 * 144 and formats.bytes_for(QType.F32, 3) == 12


def test_errors():
    with pytest.raises(FormatError, match="unknown tensor type 'Q9_K'"):
        formats.format_of("Q9_K")
    with pytest.raises(FormatError, match="unknown tensor type 99"):
        formats.format_of(99)
    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        formats.quantize(torch.zeros(2, 48), "Q8_0")
    with pytest.raises(FormatError, match="not a multiple of the block size 256"):
        formats.dequantize(np.zeros(144, np.uint8), "Q4_K", (1, 128))
    with pytest.raises(FormatError, match="IQ2_XXS: encoding is not supported"):
        formats.quantize(torch.zeros(2, 256), "IQ2_XXS")
    with pytest.raises(FormatError, match="expected 34"):
        formats.dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(FormatError, match="importance") as err:
        formats.quantize(torch.zeros(2, 256), "Q4_K", importance=torch.ones(128))
    assert "\n" not in str(err.value)


def test_leading_dims_and_broadcast_importance():
    x = _gauss(6, 512, seed=9).reshape(2, 3, 512)
    b = formats.quantize(x, "Q4_K")
    assert b.shape == (2, 3, 288) and b.dtype == torch.uint8
    assert torch.equal(b.reshape(6, 288), formats.quantize(x.reshape(6, 512), "Q4_K"))
    y = formats.dequantize(b, "Q4_K", x.shape)
    assert y.shape == x.shape and torch.equal(y.reshape(6, 512), formats.dequantize(b.reshape(6, 288), "Q4_K", (6, 512)))
    imp = torch.rand(2, 1, 512, generator=torch.Generator().manual_seed(1)) + 0.1  # per-expert importance
    bi = formats.quantize(x, "Q4_K", importance=imp)
    assert torch.equal(bi[1], formats.quantize(x[1], "Q4_K", importance=imp[1, 0]))
    # non-float input and float64 input are converted
    assert torch.equal(formats.quantize(x.double(), "Q8_0"), formats.quantize(x, "Q8_0"))


@pytest.mark.parametrize("q,with_imp", [(QType.Q3_K, False), (QType.Q4_K, True), (QType.IQ4_XS, True)],
                         ids=["Q3_K-ref", "Q4_K-imatrix", "IQ4_XS-imatrix"])
def test_loop_sums_match(monkeypatch, q, with_imp):
    """The element-by-element summation loop (used off CPU) gives ggml's bytes too."""
    monkeypatch.setattr(formats, "_NUMPY_SEQ", False)
    x, imp = kquant_data()
    got = formats.quantize(torch.from_numpy(x[:8]), q, torch.from_numpy(imp) if with_imp else None).numpy()
    monkeypatch.undo()
    want = formats.quantize(torch.from_numpy(x[:8]), q, torch.from_numpy(imp) if with_imp else None).numpy()
    assert np.array_equal(got, want)


def test_parallel_chunks_same_bytes(monkeypatch):
    """Small chunks on CPU worker threads give the same bytes, and torch's thread count is restored."""
    x, imp = kquant_data()
    threads = torch.get_num_threads()
    monkeypatch.setitem(formats._CHUNK_ELEMENTS, "cpu", 512)
    try:
        torch.set_num_threads(max(2, threads))
        got = formats.quantize(torch.from_numpy(x), QType.Q4_K, torch.from_numpy(imp)).numpy()
        assert torch.get_num_threads() == max(2, threads)
    finally:
        torch.set_num_threads(threads)
    assert hashlib.sha256(got.tobytes()).hexdigest() == GGML_DIGESTS[("Q4_K", True)]

"""Block codecs against llama.cpp's own ggml (the libggml-base that llama-cpp-python ships), via ctypes.

Encode: ``ggml_quantize_chunk`` is what ``llama-quantize`` calls per tensor (``--pure``, with or
without an imatrix): without quant_weights it runs ``quantize_row_*_ref``, with them the weighted
search. Decode: ``dequantize_row_*``. Opt-in: ``pytest -m llamacpp``.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch

from herd.quant import formats
from herd.quant.formats import FORMATS, QType

pytestmark = pytest.mark.llamacpp

ENCODE = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K,
          QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS]
DECODE = [q for q in QType if q not in (QType.F32, QType.F16, QType.BF16)]


@pytest.fixture(scope="module")
def ggml():
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip(f"llama_cpp (llama-cpp-python) is not importable: {e}")
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    found = sorted(glob.glob(os.path.join(libdir, "libggml-base.*")))
    if not found:
        pytest.skip(f"llama-cpp-python has no libggml-base in {libdir}")
    lib = ctypes.CDLL(found[0])
    if not hasattr(lib, "ggml_quantize_chunk"):
        pytest.skip(f"{found[0]} does not export ggml_quantize_chunk")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib, x: np.ndarray, q: QType, imp: np.ndarray | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = x.shape
    f = FORMATS[q]
    out = np.zeros((n, k // f.block_size * f.type_size), np.uint8)
    imp_arr = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
    lib.ggml_quantize_init(int(q))
    size = lib.ggml_quantize_chunk(int(q), x.ctypes.data, out.ctypes.data, 0, n, k,
                                   None if imp_arr is None else imp_arr.ctypes.data)
    assert size == out.nbytes
    return out


def ggml_dequantize(lib, raw: np.ndarray, q: QType) -> np.ndarray:
    fn = getattr(lib, "dequantize_row_" + q.name.lower().replace("_k", "_K"))
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0] * FORMATS[q].block_size
    out = np.zeros(n, np.float32)
    fn(raw.ctypes.data, out.ctypes.data, n)
    return out


def _test_formats():
    """The sibling test module (tests/quant has no __init__.py), for its data generators."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tf", os.path.join(os.path.dirname(__file__), "test_formats.py"))
    tf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tf)
    return tf


def _datasets():
    tf = _test_formats()
    x, imp = tf.kquant_data()
    rng = np.random.default_rng(11)
    wide = (rng.standard_normal((8, 4096)) * np.exp(rng.standard_normal((8, 1)) * 2)).astype(np.float32)
    wide[0, :: 97] *= 40  # outliers
    wide_imp = (rng.exponential(size=4096) ** 3).astype(np.float32)
    heavy = rng.standard_t(3, (32, 256)).astype(np.float32)
    heavy_imp = rng.uniform(0, 2, 256).astype(np.float32)
    edge = tf._legacy_data()  # zeros, constants, ties, subnormal, huge (fp16-overflowing) rows
    edge_imp = rng.uniform(0, 3, edge.shape[1]).astype(np.float32)
    return [("mixed", x, imp), ("wide", wide, wide_imp), ("heavy", heavy, heavy_imp), ("edge", edge, edge_imp)]


@pytest.mark.parametrize("q", ENCODE, ids=lambda q: q.name)
@pytest.mark.parametrize("with_imp", [False, True], ids=["ref", "imatrix"])
def test_encode_bytes_match_ggml(ggml, q, with_imp):
    for name, x, imp in _datasets():
        want = ggml_quantize(ggml, x, q, imp if with_imp else None)
        got = formats.quantize(torch.from_numpy(x), q, torch.from_numpy(imp) if with_imp else None).numpy()
        bad = np.nonzero((got != want).any(axis=1))[0]
        assert bad.size == 0, f"{q.name} {name}: rows {bad.tolist()} differ from ggml"


@pytest.mark.parametrize("q", [QType.F16, QType.BF16], ids=lambda q: q.name)
def test_float_encode_matches_ggml(ggml, q):
    """NaN (with payloads and signs), inf, fp16 overflow/underflow, subnormals and rounding ties."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, size=4096, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, 1024, dtype=np.uint64).astype(np.uint32) << 13) | (1 << 12)  # fp16 halfway
    bties = (rng.integers(0, 1 << 16, 1024, dtype=np.uint64).astype(np.uint32) << 16) | (1 << 15)  # bf16 halfway
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x80000000,
                        0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001] * 16 + [0] * 80, dtype=np.uint32)
    x = np.concatenate([bits, ties, bties, special]).view(np.float32).reshape(-1, 256)
    want = ggml_quantize(ggml, x, q)
    got = formats.quantize(torch.from_numpy(x.copy()), q).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("q", DECODE, ids=lambda q: q.name)
def test_decode_matches_ggml(ggml, q):
    raw = _test_formats()._random_blocks(q, n=128, seed=5)
    want = ggml_dequantize(ggml, raw, q)
    got = formats.dequantize(raw, q, want.shape).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))

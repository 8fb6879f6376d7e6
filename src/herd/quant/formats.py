"""GGUF block codecs: one table of types; decode (dequantize) and encode (quantize) on torch tensors.

Data is laid out as GGUF stores it: each row of ``n`` elements is ``n / block_size`` blocks of
``type_size`` bytes. Rows are independent, so callers may decode any slab of rows (what quantized
matmuls do).

Decoding is pure tensor ops for every type (lookup tables are built once per type and device) and
gives the same float32 values as ggml's ``dequantize_row_*``.

Encoding follows ggml's reference quantizers (``ggml-quants.c``, what ``llama-quantize`` runs):
without an importance vector the ``quantize_row_*_ref`` path, with one the path
``quantize_*(..., quant_weights)`` takes. (IQ4_NL: llama-quantize calls ``quantize_iq4_nl``, which
searches 7 scale steps either way; ``quantize_row_iq4_nl_ref`` does not search. We follow the
former, so our bytes equal llama-quantize's.) Bytes are identical to ggml's on x86-64, where
ggml-base is built without FMA (checked against llama-cpp-python's libggml-base, with and without
importance, in tests/quant/test_formats_llamacpp.py): every step is an IEEE float32 operation in
ggml's order, sums run element by element in ggml's order (vectorized over all groups at once),
``nearest_int`` and C's float-to-int conversions (x86 semantics for NaN/inf) are emulated bit for
bit, and fp16 scales are rounded to nearest even. Each candidate of a scale search runs over all
groups at once; candidates run in ggml's order where an accepted one changes the next.

Encoding runs in chunks of rows on the input's device; on CPU it uses torch's intra-op threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import numpy as np
import torch

from ..errors import FormatError


class QType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


@dataclass(frozen=True)
class Format:
    qtype: QType
    name: str
    block_size: int
    type_size: int
    can_encode: bool
    needs_imatrix: bool = False  # llama-quantize refuses these without an importance matrix

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_ENCODABLE = {
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS,
}
_NEEDS_IMATRIX = {QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S}


def _table() -> dict[QType, Format]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    out = {}
    for q in QType:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(q))]
        out[q] = Format(q, q.name, block, size, q in _ENCODABLE, q in _NEEDS_IMATRIX)
    return out


FORMATS: dict[QType, Format] = _table()


def format_of(t) -> Format:
    try:
        if isinstance(t, Format):
            return t
        if isinstance(t, str):
            return FORMATS[QType[t.strip().upper()]]
        return FORMATS[QType(int(t))]
    except (KeyError, ValueError, TypeError):
        names = ", ".join(f.name for f in FORMATS.values())
        raise FormatError(f"unknown tensor type {t!r} (expected one of {names})") from None


def bytes_for(qtype, n_elements: int) -> int:
    f = format_of(qtype)
    if n_elements % f.block_size:
        raise FormatError(f"{f.name}: {n_elements} elements is not a multiple of the block size {f.block_size}")
    return n_elements // f.block_size * f.type_size


def bits_per_weight(qtype) -> float:
    return format_of(qtype).bits_per_weight


# ---------------------------------------------------------------------------------------------- bytes


def _as_bytes(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8)
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    arr = np.ascontiguousarray(np.asarray(data)).view(np.uint8)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2k] uint8 -> int32 [..., k] little-endian 16-bit words."""
    b = b.to(torch.int32).reshape(*b.shape[:-1], -1, 2)
    return b[..., 0] | (b[..., 1] << 8)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """[..., 4k] uint8 -> int64 [..., k] little-endian 32-bit words."""
    b = b.to(torch.int64).reshape(*b.shape[:-1], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., k, 8] uint8 bits, least significant first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return (b[..., None] >> shifts) & 1


# ---------------------------------------------------------------------------------------------- tables

_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@lru_cache(maxsize=None)
def _lut(name: str, device: str) -> torch.Tensor:
    """Decode tables, built once per device. IQ grids come from gguf-py (llama.cpp's own tables)."""
    dev = torch.device(device)
    if name == "iq4nl":
        return torch.tensor(_KVALUES_IQ4NL, dtype=torch.float32, device=dev)
    import gguf.quants as gq

    if name == "ksigns":  # 7-bit sign index -> 8 factors of +-1 (the 8th bit makes the parity even)
        ks = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)
        bits = (ks[:, None] >> np.arange(8, dtype=np.uint8)) & 1
        return torch.from_numpy(np.where(bits == 1, -1.0, 1.0).astype(np.float32)).to(dev)
    cls = {"iq2xxs": gq.IQ2_XXS, "iq2xs": gq.IQ2_XS, "iq2s": gq.IQ2_S, "iq3xxs": gq.IQ3_XXS,
           "iq3s": gq.IQ3_S, "iq1s": gq.IQ1_S}[name]
    cls.init_grid()
    grid = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    return torch.from_numpy(grid.copy()).to(dev)


def _tab(name: str, like: torch.Tensor) -> torch.Tensor:
    return _lut(name, str(like.device))


# ---------------------------------------------------------------------------------------------- decode


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (the legacy-type order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n/8] bytes -> [..., n] bits, little-endian within each byte."""
    return _bits(qh).reshape(*qh.shape[:-1], n)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins (int32)."""
    s = scales.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, mn


def _scales_q3k(scales: torch.Tensor) -> torch.Tensor:
    """The 12 packed bytes of Q3_K -> 16 signed six-bit scales (int32, already minus 32)."""
    s = scales.to(torch.int32)
    low = torch.cat([s[..., 0:8] & 0x0F, s[..., 0:8] >> 4], dim=-1)  # scales 0..7, then 8..15
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=s.device)
    high = ((s[..., None, 8:12] >> shifts[:, None]) & 3).reshape(*s.shape[:-1], 16)  # j -> byte 8 + j%4, shift 2*(j//4)
    return (low | (high << 4)) - 32


def _k4_quants(qs: torch.Tensor) -> torch.Tensor:
    """[..., 128] bytes -> [..., 8 groups, 32]: per 64 values, 32 low nibbles then 32 high nibbles."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack([q & 0x0F, q >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[N, 32k] bytes -> [N, 128k] 2-bit values: per 32 bytes, shifts 0, 2, 4, 6 (the K-quant order)."""
    q = qs.reshape(qs.shape[0], -1, 1, 32) >> _shifts(qs.device, 0, 2, 4, 6)[:, None]
    return q.bitwise_and_(3).view(qs.shape[0], -1)


def _shifts(device, *values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, k, 16] bytes -> [N, k, 32]: low nibbles, then high nibbles (legacy / IQ4 order)."""
    q = qs.unsqueeze(-2) >> _shifts(qs.device, 0, 4)[:, None]
    return q.bitwise_and_(0x0F).flatten(-2)


def _dec_q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, 0:2])[:, None])


def _dec_q4_0(b):
    return _nibbles(b[:, None, 2:18])[:, 0].float().sub_(8).mul_(_f16(b[:, 0:2])[:, None])


def _dec_q4_1(b):
    v = _nibbles(b[:, None, 4:20])[:, 0].float()
    return v.mul_(_f16(b[:, 0:2])[:, None]).add_(_f16(b[:, 2:4])[:, None])


def _q5_values(qh, qs):
    return _nibbles(qs[:, None])[:, 0] | (_bits(qh).view(-1, 32) << 4)


def _dec_q5_0(b):
    return _q5_values(b[:, 2:6], b[:, 6:22]).float().sub_(16).mul_(_f16(b[:, 0:2])[:, None])


def _dec_q5_1(b):
    v = _q5_values(b[:, 4:8], b[:, 8:24]).float()
    return v.mul_(_f16(b[:, 0:2])[:, None]).add_(_f16(b[:, 2:4])[:, None])


def _dec_q2_k(b):
    sc = b[:, 0:16]
    dl = (_f16(b[:, 80:82])[:, None] * (sc & 0x0F).float())[..., None]
    ml = (_f16(b[:, 82:84])[:, None] * (sc >> 4).float())[..., None]
    q = _crumbs(b[:, 16:80]).float().view(-1, 16, 16)
    return q.mul_(dl).sub_(ml).view(-1, 256)


def _dec_q3_k(b):
    dl = (_f16(b[:, 108:110])[:, None] * _scales_q3k(b[:, 96:108]).float())[..., None]
    low = _crumbs(b[:, 32:96]).view(torch.int8)  # element (n, j, l) = n*128 + j*32 + l
    # the high bit of element n*128 + j*32 + l is bit (4n + j) of hmask[l]; a clear bit subtracts 4
    high = _bits(b[:, 0:32]).transpose(1, 2).reshape(-1, 256).view(torch.int8)
    q = (low + (high << 2)).sub_(4).float().view(-1, 16, 16)
    return q.mul_(dl).view(-1, 256)


def _dec_q4_k(b):
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = b[:, 16:144].view(-1, 4, 1, 32) >> _shifts(b.device, 0, 4)[:, None]
    v = q.bitwise_and_(0x0F).float().view(-1, 8, 32)
    return v.mul_((d * sc.float())[..., None]).sub_((dmin * mn.float())[..., None]).view(-1, 256)


def _dec_q5_k(b):
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = b[:, 48:176].view(-1, 4, 1, 32) >> _shifts(b.device, 0, 4)[:, None]
    # bit g of qh[l] is the 5th bit of group g's element l
    hb = _bits(b[:, 16:48]).transpose(1, 2).reshape(-1, 4, 2, 32)
    v = q.bitwise_and_(0x0F).bitwise_or_(hb << 4).float().view(-1, 8, 32)
    return v.mul_((d * sc.float())[..., None]).sub_((dmin * mn.float())[..., None]).view(-1, 256)


def _dec_q6_k(b):
    ql = b[:, 0:128].view(-1, 2, 1, 2, 32) >> _shifts(b.device, 0, 4)[:, None, None]  # [N, half, nib, sub, l]
    qh = b[:, 128:192].view(-1, 2, 1, 32) >> _shifts(b.device, 0, 2, 4, 6)[:, None]  # [N, half, quarter, l]
    # quarter q of a half uses ql sub (q & 1), nibble (q >> 1), and qh bits 2q
    v = ql.bitwise_and_(0x0F).view(-1, 2, 4, 32).bitwise_or_(qh.bitwise_and_(3) << 4)
    sc = (b[:, 192:208].view(torch.int8).float() * _f16(b[:, 208:210])[:, None])[..., None]
    return v.view(torch.int8).sub_(32).float().view(-1, 16, 16).mul_(sc).view(-1, 256)


def _dec_tq1_0(b):
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=b.device)
    qs0 = (b[:, None, 0:32] * pow3[:, None]).reshape(-1, 160)  # uint8 products wrap, as in C
    qs1 = (b[:, None, 32:48] * pow3[:, None]).reshape(-1, 80)
    qh = (b[:, None, 48:52] * pow3[:4, None]).reshape(-1, 16)
    q = torch.cat([qs0, qs1, qh], dim=-1).to(torch.int32)
    v = ((q * 3) >> 8) - 1
    return v.float() * _f16(b[:, 52:54])[:, None]


def _dec_tq2_0(b):
    v = _crumbs(b[:, 0:64]).to(torch.int8) - 1
    return v.float() * _f16(b[:, 64:66])[:, None]


def _dec_iq4_nl(b):
    v = _tab("iq4nl", b)[_unpack_nibbles(b[:, 2:18]).long()]
    return _f16(b[:, 0:2])[:, None] * v


def _dec_iq4_xs(b):
    d = _f16(b[:, 0:2])[:, None]
    sh = _u16(b[:, 2:4])  # [N, 1]
    sl = b[:, 4:8].to(torch.int32)
    low = torch.stack([sl & 0x0F, sl >> 4], dim=-1).reshape(-1, 8)
    high = (sh >> (2 * torch.arange(8, dtype=torch.int32, device=b.device))) & 3
    dl = d * ((low | (high << 4)) - 32).float()
    v = _tab("iq4nl", b)[_unpack_nibbles(b[:, 8:136].reshape(-1, 8, 16)).long()]
    return (dl[..., None] * v).reshape(-1, 256)


def _dec_iq2_xxs(b):
    d = _f16(b[:, 0:2])[:, None]
    w = _u32(b[:, 2:66]).reshape(-1, 8, 2)
    db = d * (0.5 + (w[..., 1] >> 28).float()) * 0.25
    idx = b[:, 2:66].reshape(-1, 8, 8)[..., 0:4].long()  # the 4 grid bytes of each 32
    shifts = torch.tensor([0, 7, 14, 21], dtype=torch.int64, device=b.device)
    sign = _tab("ksigns", b)[(w[..., 1, None] >> shifts) & 127]
    return ((db[..., None, None] * _tab("iq2xxs", b)[idx]) * sign).reshape(-1, 256)


def _dec_iq2_xs(b):
    d = _f16(b[:, 0:2])[:, None]
    qs = _u16(b[:, 2:66]).reshape(-1, 8, 4)
    sc = b[:, 66:74].to(torch.int32)
    s = torch.stack([sc & 0x0F, sc >> 4], dim=-1).float()  # [N, 8, 2]
    db = d[..., None] * (0.5 + s) * 0.25
    db = db.repeat_interleave(2, dim=-1)  # l // 2
    grid = _tab("iq2xs", b)[(qs & 511).long()]
    return ((db[..., None] * grid) * _tab("ksigns", b)[(qs >> 9).long()]).reshape(-1, 256)


def _dec_iq2_s(b):
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 2:34].reshape(-1, 8, 4).long()
    signs = b[:, 34:66].reshape(-1, 8, 4)
    qh = b[:, 66:74].long()
    sc = b[:, 74:82].to(torch.int32)
    s = torch.stack([sc & 0x0F, sc >> 4], dim=-1).float()
    db = (d[..., None] * (0.5 + s) * 0.25).repeat_interleave(2, dim=-1)
    shifts = torch.tensor([8, 6, 4, 2], dtype=torch.int64, device=b.device)
    idx = qs | ((qh[..., None] << shifts) & 0x300)
    sign = 1.0 - 2.0 * _bits(signs).float()
    return ((db[..., None] * _tab("iq2s", b)[idx]) * sign).reshape(-1, 256)


def _dec_iq3_xxs(b):
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 2:66].reshape(-1, 8, 4, 2).long()
    w = _u32(b[:, 66:98])  # [N, 8]
    db = d * (0.5 + (w >> 28).float()) * 0.5
    shifts = torch.tensor([0, 7, 14, 21], dtype=torch.int64, device=b.device)
    sign = _tab("ksigns", b)[(w[..., None] >> shifts) & 127]  # [N, 8, 4, 8]
    grid = _tab("iq3xxs", b)[qs].reshape(-1, 8, 4, 8)
    return ((db[..., None, None] * grid) * sign).reshape(-1, 256)


def _dec_iq3_s(b):
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 2:66].long()
    qh = _high_bits(b[:, 66:74], 64).long()
    signs = b[:, 74:106]
    sc = b[:, 106:110].to(torch.int32)
    s = torch.stack([sc & 0x0F, sc >> 4], dim=-1).reshape(-1, 8)
    db = d * (1 + 2 * s).float()  # [N, 8]
    grid = _tab("iq3s", b)[qs | (qh << 8)].reshape(-1, 8, 32)
    sign = (1.0 - 2.0 * _bits(signs).float()).reshape(-1, 8, 32)
    return ((db[..., None] * grid) * sign).reshape(-1, 256)


def _dec_iq1_s(b):
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 2:34].reshape(-1, 8, 4).long()
    qh = _u16(b[:, 34:50]).long()  # [N, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).float()
    delta = torch.where((qh & 0x8000) != 0, -0.125, 0.125)
    shifts = torch.tensor([0, 3, 6, 9], dtype=torch.int64, device=b.device)
    idx = qs | (((qh[..., None] >> shifts) & 7) << 8)
    grid = _tab("iq1s", b)[idx]  # [N, 8, 4, 8]
    return (dl[..., None, None] * (grid + delta[..., None, None])).reshape(-1, 256)


def _dec_iq1_m(b):
    qs = b[:, 0:32].reshape(-1, 8, 4).long()
    qh = b[:, 32:48].reshape(-1, 8, 2).long()
    sc = _u16(b[:, 48:56])  # [N, 4]
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = bits.to(torch.int16).view(torch.float16).float()[:, None, None]
    shifts = torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=b.device)
    s = ((sc[..., None] >> shifts) & 7).reshape(-1, 8, 2)  # ib -> (dl1, dl2)
    dl = d * (2 * s + 1).float()  # [N, 8, 2]
    # idx: qs[l] | qh nibble (low for even l, high for odd l) << 8; delta sign from bit 3 of that nibble
    nib = torch.stack([qh & 0x0F, qh >> 4], dim=-1).reshape(-1, 8, 4)
    idx = qs | ((nib & 7) << 8)
    delta = torch.where((nib & 8) != 0, -0.125, 0.125)
    grid = _tab("iq1s", b)[idx]  # [N, 8, 4, 8]
    dl = dl.repeat_interleave(2, dim=-1)  # l // 2
    return (dl[..., None] * (grid + delta[..., None])).reshape(-1, 256)


_DECODERS = {
    QType.Q8_0: _dec_q8_0, QType.Q4_0: _dec_q4_0, QType.Q4_1: _dec_q4_1, QType.Q5_0: _dec_q5_0,
    QType.Q5_1: _dec_q5_1, QType.Q2_K: _dec_q2_k, QType.Q3_K: _dec_q3_k, QType.Q4_K: _dec_q4_k,
    QType.Q5_K: _dec_q5_k, QType.Q6_K: _dec_q6_k, QType.TQ1_0: _dec_tq1_0, QType.TQ2_0: _dec_tq2_0,
    QType.IQ4_NL: _dec_iq4_nl, QType.IQ4_XS: _dec_iq4_xs, QType.IQ2_XXS: _dec_iq2_xxs,
    QType.IQ2_XS: _dec_iq2_xs, QType.IQ2_S: _dec_iq2_s, QType.IQ3_XXS: _dec_iq3_xxs,
    QType.IQ3_S: _dec_iq3_s, QType.IQ1_S: _dec_iq1_s, QType.IQ1_M: _dec_iq1_m,
}


def dequantize(data, qtype, shape) -> torch.Tensor:
    """Raw GGUF data of a tensor (or a slab of its rows) -> float32 tensor of `shape` (on data's device)."""
    f = format_of(qtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % f.block_size:
        raise FormatError(f"{f.name}: rows of {shape[-1]} elements are not a multiple of the block size {f.block_size}")
    raw = _as_bytes(data).reshape(-1)
    if raw.numel() != bytes_for(f.qtype, n):
        raise FormatError(f"{f.name}: {raw.numel()} bytes for {n} elements, expected {bytes_for(f.qtype, n)}")
    q = f.qtype
    if q == QType.F32:
        return raw.view(torch.float32).reshape(shape).clone()
    if q == QType.F16:
        return raw.view(torch.float16).float().reshape(shape)
    if q == QType.BF16:
        return raw.view(torch.bfloat16).float().reshape(shape)
    return _DECODERS[q](raw.reshape(-1, f.type_size)).reshape(shape)


# ---------------------------------------------------------------------------------------------- encode
#
# Conventions below: a group of n values that ggml scans with a loop is a column of an [n, M] tensor
# (M groups side by side), so "element i of every group" is the contiguous row x[i]. Candidate
# scales of a search form an extra axis: [n, T, M].

_EPS = 1e-15  # GROUP_MAX_EPS


def _f32(v) -> float:
    return float(np.float32(v))


def _div(a, b) -> torch.Tensor:
    """IEEE float32 a / b. (torch turns `scalar / tensor` into reciprocal-times-scalar, and CUDA turns
    `tensor / scalar` into a product with the reciprocal; both can differ from C's division.)"""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as sqrtf. (torch's CPU float32 sqrt is off by an ulp for many
    inputs.) Take a float64 estimate, round it, then move to the neighbour whose rounding interval
    holds sqrt(a): interval ends (midpoints) squared are exact in float64."""
    s = torch.sqrt(a.double()).float()
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    dn = torch.nextafter(s, torch.zeros_like(s))
    ad, sd = a.double(), s.double()
    hi = (sd + up.double()) * 0.5
    lo = (sd + dn.double()) * 0.5
    s = torch.where(ad > hi * hi, up, s)
    return torch.where(ad < lo * lo, dn, s)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit: add 1.5 * 2**23 in float32 and read the low mantissa bits."""
    return ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


_NUMPY_SEQ: bool | None = None


def _numpy_sums_in_order() -> bool:
    """numpy reduces an outer axis row by row (sequentially per column); torch's sum does not.
    Checked once against a plain loop so a numpy that changes this falls back to the loop."""
    global _NUMPY_SEQ
    if _NUMPY_SEQ is None:
        rng = np.random.default_rng(0)
        ok = True
        for n, m in ((40, 2), (33, 7), (256, 96)):
            a = (rng.standard_normal((n, m)) * rng.uniform(0, 1e3, (n, 1))).astype(np.float32)
            ref = a[0].copy()
            for i in range(1, n):
                ref = ref + a[i]
            ok &= bool(np.array_equal(np.add.reduce(a, axis=0).view(np.uint32), ref.view(np.uint32)))
            a3 = np.stack([a, a[::-1].copy(), a * 3])  # [K, n, M] reduced over axis 1
            ref3 = a3[:, 0].copy()
            for i in range(1, n):
                ref3 = ref3 + a3[:, i]
            ok &= bool(np.array_equal(np.add.reduce(a3, axis=1).view(np.uint32), ref3.view(np.uint32)))
        _NUMPY_SEQ = ok
    return _NUMPY_SEQ


def _seqsum(t: torch.Tensor, zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 in index order, in float32, as a C loop `s = 0; for (...) s += t[i]` does
    (zero=False: `s = t[0]; for (i = 1; ...)`). The two differ only in the sign of an all-zero sum."""
    if t.device.type == "cpu" and t.dim() > 1 and t[0].numel() >= 2 and _numpy_sums_in_order():
        a = t.detach().reshape(t.shape[0], -1).contiguous().numpy()
        acc = torch.from_numpy(np.add.reduce(a, axis=0)).reshape(t.shape[1:])
        return acc + 0.0 if zero else acc
    acc = t[0] + 0.0 if zero else t[0].clone()  # 0 + t[0] turns -0.0 into +0.0, like C
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _seqsum_k(t: torch.Tensor) -> torch.Tensor:
    """[K, n, M] -> [K, M]: K independent `s = 0; for (i...) s += t[k, i]` sums (see _seqsum)."""
    if t.device.type == "cpu" and t.shape[2] >= 2 and t.is_contiguous() and _numpy_sums_in_order():
        return torch.from_numpy(np.add.reduce(t.detach().numpy(), axis=1)) + 0.0
    acc = t[:, 0] + 0.0
    for i in range(1, t.shape[1]):
        acc += t[:, i]
    return acc


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over dim 0: the largest |x| and the signed value where it first occurs (C's `if (ax > amax)` scan)."""
    ax = x.abs()
    idx = ax.argmax(0, keepdim=True)
    return ax.gather(0, idx)[0], x.gather(0, idx)[0]


def _pos_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`m = 0; for (...) if (v > m) m = v;`"""
    return torch.where(x > 0, x, torch.zeros_like(x)).amax(dim)


def _fp16_bits(v: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 bit patterns (int32) as GGML_FP32_TO_FP16: nearest even, NaN -> sign | 0x7E00."""
    h = v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.isnan(v)
    if bool(nan.any()):
        sign = (v.view(torch.int32) >> 16) & 0x8000
        h = torch.where(nan, sign | 0x7E00, h)
    return h


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    h = _fp16_bits(v)
    return torch.stack([h & 0xFF, h >> 8], dim=-1).to(torch.uint8)


def _fp16_round(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    return _fp16_bits(v).to(torch.int16).view(torch.float16).float()


def _wrap8(v: torch.Tensor) -> torch.Tensor:
    """int -> the value an int8_t holds after assignment."""
    return ((v + 128) & 0xFF) - 128


def _f32_key(f: np.float32) -> int:
    i = int(np.array([f], np.float32).view(np.int32)[0])
    return i if i >= 0 else -(i & 0x7FFFFFFF)


def _f32_from_key(k: int) -> np.float32:
    bits = k if k >= 0 else ((-k) | 0x80000000)
    return np.array([bits & 0xFFFFFFFF], np.uint32).view(np.float32)[0]


@lru_cache(maxsize=None)
def _iq4_switch_points() -> tuple[float, ...]:
    """best_index_int8(16, kvalues_iq4nl, x) == number of these points <= x, for every float32 x.
    Between neighbours a < b ggml picks b when !(x - a < b - x) in float32, which is monotone in x;
    point k is the first float32 where that holds (found by bisection on the float ordering)."""
    out = []
    for a, b in zip(_KVALUES_IQ4NL[:-1], _KVALUES_IQ4NL[1:]):
        fa, fb = np.float32(a), np.float32(b)
        lo, hi = _f32_key(fa), _f32_key(fb)  # P(lo) false, P(hi) true
        while hi - lo > 1:
            mid = (lo + hi) // 2
            x = _f32_from_key(mid)
            if not (np.float32(x - fa) < np.float32(fb - x)):
                hi = mid
            else:
                lo = mid
        out.append(float(_f32_from_key(hi)))
    return tuple(out)


@lru_cache(maxsize=None)
def _iq4_index_lut(device: str) -> torch.Tensor:
    """The switch points are half-integers (checked), so the index only depends on floor(2x):
    a table over floor(2x) in [-256, 256] (anything beyond is past the first/last point)."""
    pts = np.array(_iq4_switch_points(), dtype=np.float64)
    assert np.all(pts * 2 == np.round(pts * 2)) and pts[0] > -128 and pts[-1] < 128
    m = np.arange(-256, 257)
    lut = (pts[None, :] * 2 <= m[:, None]).sum(1).astype(np.int32)
    return torch.from_numpy(lut).to(torch.device(device))


def _best_index_iq4(v: torch.Tensor, values: bool = False) -> torch.Tensor:
    """ggml's best_index_int8 over the 16 IQ4 values (nearest; the lower one on a float32 tie):
    int32 indices, or (values=True) the chosen values as floats. v is scratch: it is overwritten."""
    lut = _iq4_index_lut(str(v.device))
    key = v.mul_(2).floor_().clamp_(-256, 256).nan_to_num_(256.0).add_(256).to(torch.int32)  # NaN -> last, as ggml
    if values:
        lut = _tab("iq4nl", v)[lut.long()]
    return torch.index_select(lut, 0, key.view(-1)).view(v.shape)


# --- ggml's scale searches, vectorized over groups --------------------------------------------------


def _make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric scale with a 19-step search.
    x, qw: [n, M]. Returns (scale [M], L [n, M] int32 in 0..2*nmax-1).
    (|iscale * x| <= nmax + 0.9 here, where nearest_int is round-half-even.)"""
    n, M = x.shape
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    w = qw if qw is not None else x * x
    wx = w * x
    lb = torch.empty_like(x)
    sums = torch.empty(2, n, M, dtype=x.dtype, device=x.device)

    def levels(iscale):
        # nearest_int: round-half-even for |v| < 2**22 (always here when finite); NaN -> 0, +-inf -> -2**22
        l = torch.round(torch.mul(x, iscale, out=lb), out=lb)
        return l.nan_to_num_(nan=0.0, posinf=-nmax, neginf=-nmax).clamp_(-nmax, nmax - 1)

    def moments(iscale):
        l = levels(iscale)
        torch.mul(wx, l, out=sums[0])
        torch.mul(w, l, out=sums[1]).mul_(l)
        return _seqsum_k(sums)

    def iscale_at(step):
        return _div(_f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(step))), mx)

    iscale = iscale_at(0)  # = -nmax / max
    sumlx, suml2 = moments(iscale)
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), torch.zeros_like(mx))
    best = scale * sumlx
    best_iscale = iscale
    for step in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        iscale = iscale_at(step)
        sumlx, suml2 = moments(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(upd, _div(sumlx, suml2), scale)
        best = torch.where(upd, scale * sumlx, best)
        best_iscale = torch.where(upd, iscale, best_iscale)
    L = levels(best_iscale).to(torch.int32) + nmax
    L = torch.where(zero, torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def _make_q3_quants(x: torch.Tensor, nmax: int):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): start from the max scale, then up to 5 passes of
    coordinate descent on the x^2-weighted error. x: [n, M] -> (scale [M], L [n, M] int32)."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    iscale = _div(float(-nmax), mx)
    L = _nearest_int(iscale[None] * x).clamp_(-nmax, nmax - 1).float()
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum((w * L) * L)
    live = ~zero
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - (w[i] * Li) * Li
            new = _nearest_int(_div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1).float()
            slx2 = slx + wx[i] * new
            sl22 = sl2 + (w[i] * new) * new
            upd = (live & (slx > 0) & (new != Li) & (sl22 > 0)
                   & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            L[i] = torch.where(upd, new, Li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
            changed |= upd
        if not bool(changed.any()):  # a pass that changes nothing leaves the state as it was
            break
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(sumlx))
    Lq = L.to(torch.int32) + nmax
    return (torch.where(zero, torch.zeros_like(scale), scale),
            torch.where(zero[None], torch.zeros_like(Lq), Lq))


def _make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """make_qkx2_quants / make_qkx3_quants (identical when weights are given): scale and min for
    x ~ scale * L - min, searched over nstep + 1 candidate scales. An accepted candidate moves `min`,
    which the later candidates start from, so the candidates run one after another (each one
    vectorized over all groups, in reused buffers). x, w: [n, M].
    Returns (scale [M], the_min [M], L [n, M] int32).
    (iscale * (x - min) stays within [0, nmax + 1], where nearest_int is round-half-even.)"""
    n, M = x.shape
    mn = x.amin(0)
    mx = x.amax(0)
    sum_w = _seqsum(w, zero=False)
    sum_x = _seqsum(w * x, zero=False)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    lb = torch.empty_like(x)  # candidate L (as floats)
    db = torch.empty_like(x)  # weighted errors
    sums = torch.empty(3, n, M, dtype=x.dtype, device=x.device)

    def levels(iscale, start):
        torch.sub(x, start, out=lb)
        # nearest_int: round-half-even for |v| < 2**22 (always here when finite); NaN, +-inf -> 0 after the clamp
        return torch.round(lb.mul_(iscale), out=lb).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, nmax)

    def error(scale, start, l):
        torch.mul(l, scale, out=db).add_(start).sub_(x)  # scale * L + min - x
        (db.abs_() if use_mad else db.mul_(db)).mul_(w)
        return _seqsum(db)

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    best = error(scale, mn, levels(iscale, mn))
    cur_min = mn
    # the winner's L is recomputed at the end from its iscale and the min it started from
    best_iscale, best_from = iscale, mn
    for s in range(nstep + 1):
        num = _f32((np.float32(rmin) + np.float32(rdelta) * np.float32(s)) + np.float32(nmax))
        iscale = _div(num, mx - cur_min)
        l = levels(iscale, cur_min)
        wl = torch.mul(w, l, out=sums[0])
        torch.mul(wl, l, out=sums[1])
        torch.mul(wl, x, out=sums[2])
        sum_l, sum_l2, sum_xl = _seqsum_k(sums)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, _div(sum_xl, sum_l2), this_scale)
        err = error(this_scale, this_min, l)
        upd = (D > 0) & (err < best)
        best = torch.where(upd, err, best)
        scale = torch.where(upd, this_scale, scale)
        best_iscale = torch.where(upd, iscale, best_iscale)
        best_from = torch.where(upd, cur_min, best_from)
        cur_min = torch.where(upd, this_min, cur_min)
    L = levels(best_iscale, best_from).to(torch.int32)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    cur_min = torch.where(flat, mn, cur_min)
    return scale, -cur_min, L


def _make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor):
    """make_qp_quants(n, nmax, x, L, quant_weights): non-negative values on a 0..nmax grid with a
    9-step scale search and coordinate descent. x, qw: [n, M] -> (scale [M], L [n, M] int32 0..255)."""
    mx = x.amax(0)
    mx = torch.where(mx > 0, mx, torch.zeros_like(mx))
    zero = mx < _EPS
    iscale = _div(float(nmax), mx)
    L0 = _nearest_int(iscale[None] * x) & 0xFF  # stored in uint8_t
    scale = _div(1.0, iscale)
    diff = x - scale[None] * L0.float()
    best = _seqsum((qw * diff) * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_s = _div(_f32(np.float32(0.1) * np.float32(s) + np.float32(nmax)), mx)
        scale_s = _div(1.0, iscale_s)
        l = _nearest_int(iscale_s[None] * x).clamp_(max=nmax)
        diff = x - scale_s[None] * l.float()
        mse = _seqsum((qw * diff) * diff)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_s, iscale)
    l = _nearest_int(iscale[None] * x).clamp_(max=nmax)
    wx = qw * x
    sumlx = _seqsum(wx * l.float())
    suml2 = _seqsum((qw * l.float()) * l.float())
    L = (l & 0xFF).float()
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - (qw[i] * Li) * Li
            new = _nearest_int(_div(x[i] * sl2, slx)).clamp_(max=nmax)
            newf = new.float()
            slx2 = slx + wx[i] * newf
            sl22 = sl2 + (qw[i] * newf) * newf
            upd = ((slx > 0) & (sl2 > 0) & (newf != Li) & ~zero
                   & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            L[i] = torch.where(upd, (new & 0xFF).float(), Li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
            changed |= upd
        if not bool(changed.any()):
            break
    out = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(sumlx))
    Lq = L.to(torch.int32)
    return (torch.where(zero, torch.zeros_like(out), out),
            torch.where(zero[None], torch.zeros_like(Lq), Lq))


# --- packing -----------------------------------------------------------------------------------------


def _cat_bytes(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], dim=-1)


def _pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """[..., 32] values -> [..., 16] bytes: element j | element j+16 << 4, kept to 8 bits as C does."""
    return ((v[..., :16] | (v[..., 16:] << 4)) & 0xFF).to(torch.uint8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8k] 0/1 -> [..., k] bytes, little-endian bit order."""
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device))
    return (bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """[N, 256] values < 4 -> [N, 64] bytes: per 128, byte l holds elements l, l+32, l+64, l+96."""
    q = L.to(torch.int32).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64) & 0xFF


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 scales and 8 mins (0..255, normally < 64) -> the 12 bytes of Q4_K/Q5_K, OR-ed as ggml does."""
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([a, b, c], dim=-1) & 0xFF


def _pack_scales_q3k(l: torch.Tensor) -> torch.Tensor:
    """16 scales in 0..63 -> the 12 bytes of Q3_K."""
    low = (l[:, 0:8] & 0x0F) | ((l[:, 8:16] & 0x0F) << 4)
    h = (l >> 4).reshape(-1, 4, 4)  # [N, j // 4, j % 4]
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return torch.cat([low, high], dim=-1) & 0xFF


def _cols(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, k*n] -> [n, N*k]: groups of n consecutive values as columns."""
    return x.reshape(-1, n).t().contiguous()


def _rows(c: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of _cols: [n, N*k] -> [N, k*n]."""
    return c.t().reshape(N, -1)


# --- legacy types ------------------------------------------------------------------------------------


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _c_int(v: torch.Tensor) -> torch.Tensor:
    """C's float -> integer conversion as x86-64 does it (cvttss2si): truncate toward zero; NaN, inf and
    out-of-range values give INT32_MIN. Returns int32; callers keep the low byte for int8_t/uint8_t."""
    ok = v.abs() < 2147483648.0  # False for NaN and inf
    return torch.where(ok, torch.trunc(torch.where(ok, v, torch.zeros_like(v))).to(torch.int32),
                       torch.full_like(v, -2147483648, dtype=torch.int32))


def _legacy_weights(x, qw, sigma2):
    return qw * _sqrt(sigma2[:, None] + x * x)


def _enc_q8_0(x, qw, sigma2):
    d = _div(x.abs().amax(-1), 127.0)
    inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
    qs = (_c_int(_round_away(x * inv[:, None])) & 0xFF).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=-1)


def _enc_q4_0_q5_0(x, qw, sigma2, five: bool):
    levels = 16 if five else 8
    if qw is None:
        imax = x.abs().argmax(-1, keepdim=True)
        d = _div(torch.gather(x, -1, imax)[:, 0], float(-levels))
        inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
        # uint8_t xi = MIN(2 * levels - 1, (int8_t)(x * id + levels + 0.5f))
        v = _wrap8(_c_int(x * inv[:, None] + (levels + 0.5))).clamp(max=2 * levels - 1) & 0xFF
    else:
        N = x.shape[0]
        d, L = _make_qx_quants(_cols(x, 32), levels, _cols(_legacy_weights(x, qw, sigma2), 32))
        v = _rows(L, N)
    if not five:
        return torch.cat([_fp16_bytes(d), _pack_nibbles(v)], dim=-1)
    return torch.cat([_fp16_bytes(d), _pack_bits((v >> 4) & 1), _pack_nibbles(v & 0x0F)], dim=-1)


def _enc_q4_1_q5_1(x, qw, sigma2, five: bool):
    top = 31 if five else 15
    if qw is None:
        lo, hi = x.amin(-1), x.amax(-1)
        d = _div(hi - lo, float(top))
        inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
        v = _c_int((x - lo[:, None]) * inv[:, None] + 0.5)
        # Q4_1: uint8_t xi = MIN(15, (int8_t)(...)); Q5_1: uint8_t xi = (uint8_t)(...)
        v = v & 0xFF if five else _wrap8(v).clamp(max=top) & 0xFF
        m = lo
    else:
        N = x.shape[0]
        d, the_min, L = _make_qkx_quants(_cols(x, 32), _cols(_legacy_weights(x, qw, sigma2), 32), top,
                                         -0.9, 0.05, 36, False)
        m = -the_min
        v = _rows(L, N)
    head = [_fp16_bytes(d), _fp16_bytes(m)]
    if not five:
        return torch.cat([*head, _pack_nibbles(v)], dim=-1)
    return torch.cat([*head, _pack_bits((v >> 4) & 1), _pack_nibbles(v & 0x0F)], dim=-1)


# --- K-quants ----------------------------------------------------------------------------------------


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Per block (row of x), the sequential float32 sum of squares."""
    return _seqsum((x * x).t().contiguous())


def _requant(x, d, m, L, lo, hi):
    """ggml's last pass: where the (fp16-rounded) group scale d is non-zero, L = clamp(round((x + m) / d)).
    x [N, G, n]; d, m [N, G] (m None for symmetric types); L [N, G, n] kept where d == 0."""
    num = x + m[..., None] if m is not None else x
    Lr = _nearest_int(_div(num, d[..., None].expand_as(num))).clamp_(lo, hi)
    return torch.where((d != 0)[..., None], Lr, L)


def _enc_q2_k(x, qw, sigma2):
    N = x.shape[0]
    xc = _cols(x, 16)
    if qw is None:
        scale, the_min, L = _make_qkx_quants(xc, xc.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scale.reshape(N, 16), the_min.reshape(N, 16)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _nearest_int(_div(15.0, max_scale)[:, None] * scales) & 0xFF
        ls = torch.where(has_s[:, None], ls, torch.zeros_like(ls))
        lm = _nearest_int(_div(15.0, max_min)[:, None] * mins)
        sc = torch.where(has_m[:, None], ls | (lm << 4), ls) & 0xFF
        dq = torch.where(has_s, _div(max_scale, 15.0), torch.zeros_like(max_scale))
        mq = torch.where(has_m, _div(max_min, 15.0), torch.zeros_like(max_min))
    else:
        sig = _div(_sum_sq(x), 256.0)
        w = qw * _sqrt(sig[:, None] + x * x)
        wc = _cols(w, 16)
        sw = _seqsum(wc).reshape(N, 16)
        scale, the_min, L = _make_qkx_quants(xc, wc, 3, -0.9, 0.05, 36, False)
        swt = sw.t().contiguous()
        dq, Ls = _make_qp_quants(scale.reshape(N, 16).t().contiguous(), 15, swt)
        mq, Lm = _make_qp_quants(the_min.reshape(N, 16).t().contiguous(), 15, swt)
        sc = (Ls.t() | (Lm.t() << 4)) & 0xFF
    d16, m16 = _fp16_round(dq), _fp16_round(mq)
    dl = d16[:, None] * (sc & 0x0F).float()
    ml = m16[:, None] * (sc >> 4).float()
    L = _requant(x.reshape(N, 16, 16), dl, ml, _rows(L, N).reshape(N, 16, 16), 0, 3)
    return _cat_bytes(sc, _pack_crumbs(L.reshape(N, 256)), _fp16_bytes(dq), _fp16_bytes(mq))


def _enc_q3_k(x, qw, sigma2):
    N = x.shape[0]
    xc = _cols(x, 16)
    if qw is None:
        scale, L = _make_q3_quants(xc, 4)
        scales = scale.reshape(N, 16)
        _, max_scale = _first_absmax(scales.t())
        has = max_scale != 0
        iscale = _div(-32.0, max_scale)
        l = _wrap8(_nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32
        packed = torch.where(has[:, None], _pack_scales_q3k(l), torch.zeros(N, 12, dtype=l.dtype, device=x.device))
        dq = torch.where(has, _div(1.0, iscale), torch.zeros_like(iscale))
    else:
        sig = _div(2 * _sum_sq(x), 256.0)
        w = qw * _sqrt(sig[:, None] + x * x)
        wc = _cols(w, 16)
        sw = _seqsum(wc).reshape(N, 16)
        scale, L = _make_qx_quants(xc, 4, wc)
        dq, Ls = _make_qx_quants(scale.reshape(N, 16).t().contiguous(), 32, sw.t().contiguous())
        packed = _pack_scales_q3k(Ls.t())
    d16 = _fp16_round(dq)
    dl = d16[:, None] * _scales_q3k(packed).float()
    L = _requant(x.reshape(N, 16, 16), dl, None, _rows(L, N).reshape(N, 16, 16) - 4, -4, 3) + 4
    L = L.reshape(N, 256)
    high = (L > 3).to(torch.int32)  # element j's bit goes to hmask[j % 32], bit j // 32
    hmask = _pack_bits(high.reshape(N, 8, 32).transpose(1, 2).reshape(N, 256))
    return _cat_bytes(hmask, _pack_crumbs(L - 4 * high), packed, _fp16_bytes(dq))


def _enc_q45_k(x, qw, sigma2, nmax: int):
    N = x.shape[0]
    xc = _cols(x, 32)
    if qw is None:
        av_x = _sqrt(_div(_seqsum(xc * xc), 32.0))
        w = av_x[None] + xc.abs()
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scale, the_min, L = _make_qkx_quants(xc, w, nmax, rmin, rdelta, nstep, False)
        scales, mins = scale.reshape(N, 8), the_min.reshape(N, 8)
        max_scale, max_min = _pos_max(scales), _pos_max(mins)
        inv_s = torch.where(max_scale > 0, _div(63.0, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _div(63.0, max_min), torch.zeros_like(max_min))
        ls = (_nearest_int(inv_s[:, None] * scales) & 0xFF).clamp(max=63)
        lm = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp(max=63)
        dq, mq = _div(max_scale, 63.0), _div(max_min, 63.0)
    else:
        sig = _div(2 * _sum_sq(x), 256.0)
        w = qw * _sqrt(sig[:, None] + x * x)
        wc = _cols(w, 32)
        sw = _seqsum(wc).reshape(N, 8).t().contiguous()
        scale, the_min, L = _make_qkx_quants(xc, wc, nmax, -0.9, 0.05, 36, False)
        dq, Ls = _make_qp_quants(scale.reshape(N, 8).t().contiguous(), 63, sw)
        mq, Lm = _make_qp_quants(the_min.reshape(N, 8).t().contiguous(), 63, sw)
        ls, lm = Ls.t(), Lm.t()
        if nmax == 31:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _pack_scale_min_k4(ls, lm)
    sc, mn = _scale_min_k4(packed)
    dl = _fp16_round(dq)[:, None] * sc.float()
    ml = _fp16_round(mq)[:, None] * mn.float()
    L = _requant(x.reshape(N, 8, 32), dl, ml, _rows(L, N).reshape(N, 8, 32), 0, nmax).reshape(N, 4, 2, 32)
    head = [_fp16_bytes(dq), _fp16_bytes(mq), packed]
    if nmax == 15:
        return _cat_bytes(*head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(N, 128))
    low, high = L & 0x0F, L >> 4
    qh = _pack_bits(high.permute(0, 3, 1, 2).reshape(N, 256))  # qh[j] bit 2c+h: chunk c, half h
    return _cat_bytes(*head, qh, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(N, 128))


def _enc_q6_k(x, qw, sigma2):
    N = x.shape[0]
    scale, L = _make_qx_quants(_cols(x, 16), 32, _cols(qw, 16) if qw is not None else None)
    scales = scale.reshape(N, 16)
    amax, max_scale = _first_absmax(scales.t())
    empty = amax < _EPS
    iscale = _div(-128.0, max_scale)
    dq = _div(1.0, iscale)
    sq = _wrap8(_nearest_int(iscale[:, None] * scales).clamp(max=127))
    dl = _fp16_round(dq)[:, None] * sq.float()
    L = _requant(x.reshape(N, 16, 16), dl, None, _rows(L, N).reshape(N, 16, 16) - 32, -32, 31) + 32
    L = L.reshape(N, 2, 4, 32)  # [half, quarter, l]
    ql = torch.stack([L[:, :, 0] & 0x0F | ((L[:, :, 2] & 0x0F) << 4),
                      L[:, :, 1] & 0x0F | ((L[:, :, 3] & 0x0F) << 4)], dim=2).reshape(N, 128)
    h = L >> 4
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(N, 64)
    out = _cat_bytes(ql, qh, sq & 0xFF, _fp16_bytes(dq))
    return torch.where(empty[:, None], torch.zeros_like(out), out)


# --- IQ4 ---------------------------------------------------------------------------------------------


def _enc_iq4(x, qw, sigma2, xs: bool):
    """quantize_row_iq4_nl_impl with ntry = 7 (super-block 32 for IQ4_NL, 256 for IQ4_XS)."""
    N, S = x.shape
    sig = _sum_sq(x) * _f32(2.0 / S)
    xc = _cols(x, 32)
    if qw is None:
        w = xc * xc
    else:
        w = _cols(qw * _sqrt(sig[:, None] + x * x), 32)
    amax, mx = _first_absmax(xc)
    zero = amax < _EPS
    n, M = xc.shape
    vb = torch.empty_like(xc)
    sums = torch.empty(2, n, M, dtype=x.dtype, device=x.device)

    def moments(inv):
        q = _best_index_iq4(torch.mul(xc, inv, out=vb), values=True)
        wq = torch.mul(w, q, out=sums[0])
        torch.mul(wq, q, out=sums[1])
        wq.mul_(xc)
        return _seqsum_k(sums)

    sumqx, sumq2 = moments(_div(1.0, _div(-mx, -127.0)))
    d = torch.where(sumq2 > 0, _div(sumqx, sumq2), torch.zeros_like(sumqx))
    best = d * sumqx
    for t in range(-7, 8):
        sumqx, sumq2 = moments(_div(float(t - 127), mx))
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(upd, _div(sumqx, sumq2), d)
        best = torch.where(upd, d * sumqx, best)
    scales = torch.where(zero, torch.zeros_like(d), d).reshape(N, S // 32)
    if not xs:
        s = scales[:, 0]
        inv = torch.where(s != 0, _div(1.0, s), torch.zeros_like(s))
        L = _best_index_iq4(inv[:, None] * x)
        return _cat_bytes(_fp16_bytes(s), _pack_nibbles(L))
    amax_s, max_scale = _first_absmax(scales.t())
    max_scale = torch.where(amax_s > 0, max_scale, torch.zeros_like(max_scale))
    d = _div(-max_scale, 32.0)
    inv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    l = _nearest_int(inv[:, None] * scales).clamp(-32, 31)
    dl = d[:, None] * l.float()
    idl = torch.where(dl != 0, _div(1.0, dl), torch.zeros_like(dl))
    L = _best_index_iq4(idl[..., None] * x.reshape(N, 8, 32))
    l = l + 32
    sl = (l[:, 0::2] & 0x0F) | ((l[:, 1::2] & 0x0F) << 4)
    sh = ((l >> 4) << (2 * torch.arange(8, dtype=l.dtype, device=x.device))).sum(-1)
    return _cat_bytes(_fp16_bytes(d), sh[:, None] & 0xFF, sh[:, None] >> 8, sl, _pack_nibbles(L).reshape(N, 128))


_ENCODERS = {
    QType.Q8_0: _enc_q8_0,
    QType.Q4_0: lambda x, w, s: _enc_q4_0_q5_0(x, w, s, False),
    QType.Q5_0: lambda x, w, s: _enc_q4_0_q5_0(x, w, s, True),
    QType.Q4_1: lambda x, w, s: _enc_q4_1_q5_1(x, w, s, False),
    QType.Q5_1: lambda x, w, s: _enc_q4_1_q5_1(x, w, s, True),
    QType.Q2_K: _enc_q2_k,
    QType.Q3_K: _enc_q3_k,
    QType.Q4_K: lambda x, w, s: _enc_q45_k(x, w, s, 15),
    QType.Q5_K: lambda x, w, s: _enc_q45_k(x, w, s, 31),
    QType.Q6_K: _enc_q6_k,
    QType.IQ4_NL: lambda x, w, s: _enc_iq4(x, w, s, False),
    QType.IQ4_XS: lambda x, w, s: _enc_iq4(x, w, s, True),
}

# Legacy types with an importance vector scale their weights by the whole row's mean square.
_ROW_SIGMA = {QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1}
# Elements (times search width) encoded per chunk: bounds the temporaries of the vectorized searches.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 22}


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """ggml's fp32 -> bf16: quiet NaNs, round to nearest even."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    out = torch.where(nan, (n >> 16) | 64, rounded) & 0xFFFF
    return out.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(*x.shape[:-1], -1)


def quantize(x: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float tensor [..., row_len] -> uint8 [..., row_len // block_size * type_size] (on x's device).

    `importance`: llama.cpp's quant_weights (an imatrix row): one weight per column, shape [row_len]
    or anything that broadcasts to x (e.g. [E, 1, row_len] for an expert stack). Types that ignore it
    in llama.cpp (F32/F16/BF16/Q8_0) ignore it here.
    """
    f = format_of(qtype)
    if not f.can_encode:
        raise FormatError(f"{f.name}: encoding is not supported (decoding is)")
    x = torch.as_tensor(x).detach().to(torch.float32).contiguous()
    if x.dim() == 0:
        raise FormatError(f"{f.name}: cannot quantize a scalar")
    row = x.shape[-1]
    if row % f.block_size:
        raise FormatError(f"{f.name}: rows of {row} elements are not a multiple of the block size {f.block_size}")
    lead = x.shape[:-1]
    q = f.qtype
    if q == QType.F32:
        return x.view(torch.uint8).reshape(*lead, -1).clone()
    if q == QType.F16:
        h = _fp16_bits(x.reshape(-1))
        return h.to(torch.int16).view(torch.uint8).reshape(*lead, -1)
    if q == QType.BF16:
        return _bf16_bytes(x).reshape(*lead, -1)
    qw = None
    if importance is not None and q != QType.Q8_0:
        qw = torch.as_tensor(importance).detach().to(device=x.device, dtype=torch.float32)
        if qw.dim() == 0 or qw.shape[-1] != row:
            raise FormatError(f"{f.name}: importance has shape {list(qw.shape)}, expected [{row}] (one weight per column)")
        try:
            qw = torch.broadcast_to(qw, x.shape)
        except RuntimeError:
            raise FormatError(f"{f.name}: importance of shape {list(qw.shape)} does not broadcast to {list(x.shape)}") from None
        qw = qw.reshape(-1, row)
    rows = x.reshape(-1, row)
    sigma = None
    if qw is not None and q in _ROW_SIGMA:
        sigma = _div(_seqsum((rows * rows).t().contiguous()), float(row))
    bs = f.block_size
    nblk_row = row // bs
    blocks = rows.reshape(-1, bs)
    wblocks = qw.reshape(-1, bs) if qw is not None else None
    sblocks = sigma.repeat_interleave(nblk_row) if sigma is not None else None
    n = blocks.shape[0]
    budget = _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS["cuda"])
    step = max(1, budget // bs)
    enc = _ENCODERS[q]
    out = torch.empty(n, f.type_size, dtype=torch.uint8, device=x.device)

    def run(s: int) -> None:
        e = min(n, s + step)
        out[s:e] = enc(blocks[s:e], None if wblocks is None else wblocks[s:e],
                       None if sblocks is None else sblocks[s:e])

    if x.device.type != "cpu" or n <= step or torch.get_num_threads() <= 1:
        for s in range(0, n, step):
            run(s)
    else:
        with _chunk_workers() as workers:
            step = max(1, min(step, -(-n // workers)))
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, range(0, n, step)))
    return out.reshape(*lead, nblk_row * f.type_size)


_WORKERS_LOCK = threading.Lock()


@contextmanager
def _chunk_workers():
    """CPU encoding: chunks in parallel on torch.get_num_threads() Python threads, each op single-threaded
    (torch ops release the GIL). The searches are long chains of small element-wise ops; with intra-op
    threads every op is a barrier, which on a loaded machine costs several times the work itself.
    torch's thread count is process-wide, so it is lowered for the call and restored (one call at a time)."""
    with _WORKERS_LOCK:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield n
        finally:
            torch.set_num_threads(n)

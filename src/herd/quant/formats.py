"""GGUF block codecs: one table of types, decode (dequantize) and encode (quantize) on torch tensors.

Data is laid out as GGUF stores it: each row of ``n`` elements is ``n / block_size`` blocks of
``type_size`` bytes. Rows are independent, so callers may decode any slab of rows (what quantized
matmuls do).

Status (see the GGUF issue): decoding of F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K
is vectorized torch; the other decodable types go through ``gguf.quants`` (llama.cpp's numpy port), so
they are exact but slower. Encoding covers F32/F16/BF16 and the legacy block types (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1) with llama.cpp's reference rounding; the K-quant and IQ4 encoders are not written yet
(``can_encode`` is False for them).
"""

from __future__ import annotations

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
    needs_imatrix: bool = False  # llama.cpp refuses these without an importance matrix

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_ENCODABLE = {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1}
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
        if isinstance(t, str):
            return FORMATS[QType[t.upper()]]
        return FORMATS[QType(int(t))]
    except (KeyError, ValueError):
        raise FormatError(f"unknown tensor type {t!r} (expected one of {', '.join(f.name for f in FORMATS.values())})") from None


def bytes_for(qtype, n_elements: int) -> int:
    f = format_of(qtype)
    if n_elements % f.block_size:
        raise FormatError(f"{f.name}: {n_elements} elements is not a multiple of the block size {f.block_size}")
    return n_elements // f.block_size * f.type_size


def bits_per_weight(qtype) -> float:
    return format_of(qtype).bits_per_weight


def _as_bytes(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.view(torch.uint8) if data.dtype != torch.uint8 else data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    arr = np.ascontiguousarray(np.asarray(data)).view(np.uint8)
    return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------- decode


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (the legacy-type order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n/8] bytes -> [..., n] bits, little-endian within each byte."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., :, None] >> shifts) & 1).reshape(*qh.shape[:-1], n)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins."""
    s = scales.to(torch.int32)
    sc = torch.empty(*s.shape[:-1], 8, dtype=torch.int32, device=s.device)
    mn = torch.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.float(), mn.float()


def _k4_quants(qs: torch.Tensor) -> torch.Tensor:
    """[..., 128] bytes -> [..., 8 groups, 32]: per 64 values, 32 low nibbles then 32 high nibbles."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack([q & 0x0F, q >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32)


def _decode_blocks(b: torch.Tensor, q: QType) -> torch.Tensor:
    """[nblocks, type_size] uint8 -> [nblocks, block_size] float32."""
    if q == QType.Q8_0:
        return _f16(b[:, 0:2]) [:, None] * b[:, 2:].view(torch.int8).float()
    if q == QType.Q4_0:
        return _f16(b[:, 0:2])[:, None] * (_unpack_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    if q == QType.Q4_1:
        return _f16(b[:, 0:2])[:, None] * _unpack_nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])[:, None]
    if q == QType.Q5_0:
        v = _unpack_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)
        return _f16(b[:, 0:2])[:, None] * (v.to(torch.int8) - 16).float()
    if q == QType.Q5_1:
        v = _unpack_nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
        return _f16(b[:, 0:2])[:, None] * v.float() + _f16(b[:, 2:4])[:, None]
    if q in (QType.Q4_K, QType.Q5_K):
        d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
        sc, mn = _scale_min_k4(b[:, 4:16])
        if q == QType.Q4_K:
            v = _k4_quants(b[:, 16:144])
        else:
            v = _k4_quants(b[:, 48:176])
            # bit 2i of qh[l] is the 5th bit of group 2i's element l, bit 2i+1 of group 2i+1's
            hb = _high_bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2)
            v = v | (hb << 4)
        return ((d * sc)[..., None] * v.float() - (dmin * mn)[..., None]).reshape(-1, 256)
    if q == QType.Q6_K:
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
        sc = b[:, 192:208].view(torch.int8).float()
        d = _f16(b[:, 208:210])[:, None]
        low = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
        high = (qh >> shifts) & 3
        v = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(-1, 16, 16)
        return (d[..., None] * sc[..., None] * v).reshape(-1, 256)
    raise KeyError(q)


_TORCH_DECODE = {QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K}


def dequantize(data, qtype, shape) -> torch.Tensor:
    """Raw GGUF data of a tensor (or a slab of its rows) -> float32 tensor of `shape`."""
    f = format_of(qtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
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
    if q in _TORCH_DECODE:
        return _decode_blocks(raw.reshape(-1, f.type_size), q).reshape(shape)
    import gguf.quants

    out = gguf.quants.dequantize(raw.numpy().reshape(-1, f.type_size), gguf.GGMLQuantizationType(int(q)))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


# ---------------------------------------------------------------------------------------------- encode


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _to_f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """[..., 32] values < 16 -> [..., 16] bytes (element j low nibble, element j+16 high nibble)."""
    return (v[..., :16] | (v[..., 16:] << 4)).to(torch.uint8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., 32] 0/1 -> [..., 4] bytes, little-endian bit order."""
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(bits.device)
    return (bits.reshape(*bits.shape[:-1], 4, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _encode_blocks(x: torch.Tensor, q: QType) -> torch.Tensor:
    """[nblocks, 32] float32 -> [nblocks, type_size] uint8 (llama.cpp's reference rounding)."""
    if q == QType.Q8_0:
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        qs = _round_away(x * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([_to_f16_bytes(d[:, 0]), qs], dim=-1)
    if q in (QType.Q4_0, QType.Q5_0):
        levels = 8 if q == QType.Q4_0 else 16
        imax = x.abs().argmax(-1, keepdim=True)
        d = torch.gather(x, -1, imax) / -levels
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = torch.trunc(x * inv + (levels + 0.5)).clamp(0, 2 * levels - 1).to(torch.int32)
        if q == QType.Q4_0:
            return torch.cat([_to_f16_bytes(d[:, 0]), _pack_nibbles(v)], dim=-1)
        return torch.cat([_to_f16_bytes(d[:, 0]), _pack_bits(v >> 4), _pack_nibbles(v & 0x0F)], dim=-1)
    if q in (QType.Q4_1, QType.Q5_1):
        top = 15 if q == QType.Q4_1 else 31
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / top
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = torch.trunc((x - lo) * inv + 0.5).clamp(0, top).to(torch.int32)
        head = [_to_f16_bytes(d[:, 0]), _to_f16_bytes(lo[:, 0])]
        if q == QType.Q4_1:
            return torch.cat([*head, _pack_nibbles(v)], dim=-1)
        return torch.cat([*head, _pack_bits(v >> 4), _pack_nibbles(v & 0x0F)], dim=-1)
    raise KeyError(q)


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """ggml's fp32 -> bf16: quiet NaNs, round to nearest even."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    out = torch.where(nan, ((n & 0xFFFF0000) | (64 << 16)) >> 16, rounded) & 0xFFFF
    return out.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(*x.shape[:-1], -1)


def quantize(x: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float tensor [..., row_len] -> uint8 [..., row_len // block_size * type_size]."""
    f = format_of(qtype)
    if not f.can_encode:
        raise FormatError(f"{f.name}: encoding is not implemented yet (decoding is)")
    x = torch.as_tensor(x).detach().to(torch.float32).contiguous()
    row = x.shape[-1]
    if row % f.block_size:
        raise FormatError(f"{f.name}: rows of {row} elements are not a multiple of the block size {f.block_size}")
    lead = x.shape[:-1]
    q = f.qtype
    if q == QType.F32:
        return x.view(torch.uint8).reshape(*lead, -1)
    if q == QType.F16:
        return x.to(torch.float16).view(torch.uint8).reshape(*lead, -1)
    if q == QType.BF16:
        return _bf16_bytes(x).reshape(*lead, -1)
    blocks = _encode_blocks(x.reshape(-1, f.block_size), q)
    return blocks.reshape(*lead, row // f.block_size * f.type_size)

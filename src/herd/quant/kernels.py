"""Fast CPU execution paths for quantized weights, chosen once per tensor type.

A ``QTensor`` on its own decodes GGUF blocks slab by slab for every matmul (exact, but the block decoders
run at ~0.2-1 G weights/s in torch). When a model is loaded, ``select_paths`` gives each quantized weight
one of these paths, by type (``PATHS``); the weight is repacked on first use (per expert for [E, out, in]
stacks, so a decode step repacks and reads only the experts it selects) and the repacked form is cached:

* ``vnni`` — on CPUs with int8 dot-product instructions (AVX-512 VNNI / AVX-VNNI), every type below: the
  weight is decoded once and requantized to int8 with one scale per row; each call quantizes the input rows
  to int8 the same way (one scale per row, as llama.cpp quantizes activations for its dot products) and runs
  ``torch._int_mm`` (exact int32 accumulation), then applies both scales. Not exact: two roundings of at
  most half an int8 step of a row's largest value (weight row, input row) — small against these types' own
  rounding; the measured KL divergence per type is in benchmarks/RESULTS.md. It is 4-7x faster than the
  paths below at every batch size on such a CPU, at 8 bits per weight in memory (``HERD_FAST_KERNELS=int4``
  keeps 4-bit types in the 4-bit pack instead: half the memory, slower). ``_int_mm`` costs ~3 us per call
  beyond its streaming, where fbgemm's one-op dynamic int8 linear (tried before) costs ~26 us, and it ran
  1536-2048 x 1024 matrices ~1.4-2.3x faster at 256 rows; the compiled decode step fuses the input
  quantization and scales around it (runtime/compiled.py).
* ``kquant`` — Q4_K and Q6_K on such a CPU, where herd's own kernels are built (``native``): the type's own
  codes and scales, read at its own width; ``vnni`` serves them otherwise.
* ``int4`` — Q4_0, Q4_1, Q4_K: each value is code * step + offset with a 4-bit code and one (step, offset)
  per 32 values (Q4_0: d, -8d; Q4_1: d, m; Q4_K: d*sc, -dmin*m per sub-block), which is torch's int4
  format ``(code - 8) * scale + zero`` with scale = step, zero = offset + 8*step; small batches run
  ``aten._weight_int4pack_mm_for_cpu`` (group size 32). The codes are exact; scale and zero are rounded
  to bfloat16 (the kernel's only fast dtype here: with float32 activations it runs ~40x slower), and
  activations/outputs are bfloat16 inside that kernel.
* ``int4x2`` — Q8_0, Q5_0, Q5_1, Q5_K: the same affine form with 5- or 8-bit codes, split into two 4-bit
  planes (code = 16*hi + lo) laid side by side along K, the input repeated to match: one int4 kernel call
  over 2K, codes exact, the same bfloat16 rounding of scales as ``int4``.
* ``int8`` — Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS (scales per 16 values or non-linear codebooks: no exact
  int4 form with groups of 32): decoded once and requantized to int8 with one scale per row for
  ``aten._weight_int8pack_mm``. Not exact: the added error is at most half an int8 step of the row's
  largest value, a small fraction of these types' own rounding — the measured KL divergence is in
  benchmarks/RESULTS.md.
* ``dequant`` — every other type (and any weight whose shape the kernels do not take): QTensor's own
  slab decoding into a reusable float32 buffer.

The int4 and int8 kernels are compute-bound on an AVX2 CPU once a batch has more than a few rows, so above
``SMALL_BATCH`` rows (prefill) those repacked weights are expanded into a reusable float32 buffer and
multiplied with the BLAS GEMM instead (cheap: codes are already unpacked, no block decoding); ``vnni`` runs
``_int_mm`` at every batch size, and matrices of ``PREPACK_ROWS`` rows or more (output heads) go through
oneDNN's prepacked int8 linear instead.

Dense bfloat16 weights (not quantized) get ``PackedBF16`` on CPUs with bf16 dot products: oneDNN's own
layout, made once, bit-identical results. Weights that always read one input (q/k/v, gate/up) are fused
into one matrix on both the ``vnni`` and the bf16 path (``layers.linears``, ``prepare_fused``).

Switch every fast path off with ``HERD_FAST_KERNELS=0`` (or ``set_enabled(False)``, or ``with exact():``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import torch
import torch.nn.functional as F

from ..switches import env_switch
from . import formats
from .formats import QType

GROUP = 32  # int4 group size: every int4 type here has (scale, min) per 32 values
SMALL_BATCH = 8  # rows of x up to which the fused kernels beat dequantize + GEMM (measured on AVX2)

PATHS: dict[QType, str] = {
    QType.Q4_0: "int4", QType.Q4_1: "int4", QType.Q4_K: "int4",
    QType.Q8_0: "int4x2", QType.Q5_0: "int4x2", QType.Q5_1: "int4x2", QType.Q5_K: "int4x2", QType.Q6_K: "int8",
    QType.Q2_K: "int8", QType.Q3_K: "int8", QType.IQ4_NL: "int8", QType.IQ4_XS: "int8",
}

CODE_BITS = {QType.Q4_0: 4, QType.Q4_1: 4, QType.Q4_K: 4, QType.Q5_0: 5, QType.Q5_1: 5, QType.Q5_K: 5, QType.Q8_0: 8}

_MODE = os.environ.get("HERD_FAST_KERNELS", "1").lower()
_enabled = _MODE not in ("0", "false", "no", "off")
_prefer_int4 = _MODE in ("int4", "compact")
_VNNI: bool | None = None


def has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI), where ``torch._int_mm`` is the fastest
    matmul torch has; without them (plain AVX2) its int8 products are no faster than the 4-bit kernel."""
    global _VNNI
    if _VNNI is None:
        flags = _cpu_flags()
        _VNNI = ("avx512_vnni" in flags or "avx_vnni" in flags) and hasattr(torch, "_int_mm")
    return _VNNI


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


_BF16: bool | None = None


def has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512-BF16 / AMX), where oneDNN's bf16 matmul on a
    weight laid out for it once runs at the memory bandwidth (torch's plain bf16 linear: ~0.6x of it)."""
    global _BF16
    if _BF16 is None:
        flags = _cpu_flags()
        _BF16 = (("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    return _BF16


_scratch = threading.local()


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fast paths on or off for weights used from now on (repacked forms stay cached)."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def exact():
    """Within this block every quantized weight decodes its blocks exactly (what evaluation wants: the
    error of the format, not of a kernel). Process-wide, like ``set_enabled``."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def path_for(qtype, shape: tuple[int, ...]) -> str:
    """The path a weight of this type and shape ([out, in] or [E, out, in]) gets."""
    path = PATHS.get(formats.format_of(qtype).qtype, "dequant")
    if has_int8_dot() and native_kquant(qtype, shape):
        return "kquant"
    if path != "dequant" and has_int8_dot() and not (_prefer_int4 and path == "int4"):
        return "vnni"
    out, k = shape[-2], shape[-1]
    if path.startswith("int4") and (not row_block() or out % row_block() or k % GROUP):
        return "dequant"  # Int4Weight.dequantize reads torch's int4 layout (blocks of 32 or 64 output rows)
    return path


def native_kquant(qtype, shape: tuple[int, ...]) -> bool:
    """Whether a weight takes herd's own K-quant kernels (``native``): Q4_K / Q6_K of a fitting shape, with
    the kernels built for AVX512-VNNI."""
    from . import native

    return native.supports(qtype, shape) and native.vectorized()


def _buffer(numel: int) -> torch.Tensor:
    """One float32 buffer per thread for an expanded weight, reused by every layer."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


# ---------------------------------------------------------------------------------------------- int4


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def affine_parts(blocks: torch.Tensor, qtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF blocks [rows, row_bytes] of an affine type -> (codes uint8 [rows, K], step, offset float32
    [rows, K/32]) with w = code * step + offset exactly (in float32), one (step, offset) per 32 values."""
    q = formats.format_of(qtype).qtype
    f = formats.format_of(q)
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, f.type_size)  # [rows, blocks, bytes]
    if q == QType.Q8_0:
        d = _f16(b[..., 0:2])
        return (b[..., 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8).reshape(rows, -1), d, -128 * d
    if q in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1):
        qs = b[..., -16:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # low nibbles are values 0-15, high 16-31
        if q in (QType.Q5_0, QType.Q5_1):  # bit i of the 32-bit qh is value i's fifth bit
            qh = b[..., -20:-16]
            codes |= (((qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, -1, 32)) << 4
        d = _f16(b[..., 0:2])
        base = {QType.Q4_0: -8 * d, QType.Q5_0: -16 * d}.get(q)
        return codes.reshape(rows, -1), d, base if base is not None else _f16(b[..., 2:4])
    if q in (QType.Q4_K, QType.Q5_K):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = formats._scale_min_k4(b[..., 4:16])
        start = 16 if q == QType.Q4_K else 48
        qs = b[..., start : start + 128].reshape(rows, -1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]
        codes = (qs & 0x0F).reshape(rows, -1, 8, 32)  # per 64 values: 32 low nibbles, then 32 high ones
        if q == QType.Q5_K:  # bit g of qh[l] is the fifth bit of sub-block g's value l
            qh = b[..., 16:48]
            codes = codes | (((qh[..., None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1) << 4)
        return codes.reshape(rows, -1), (d * sc.float()).reshape(rows, -1), (-dmin * mn.float()).reshape(rows, -1)
    raise ValueError(f"{f.name} has no affine (code * step + offset per 32) form")


_ROW_BLOCK: int | None = None  # output rows per block of torch's CPU int4 pack; 0 = a layout we cannot read


def row_block() -> int:
    """torch's CPU int4 pack stores each block of B output rows as [K, B/2] bytes, byte i holding rows i (low
    nibble) and i + B/2 (high); B depends on the kernel torch picked for this CPU (32 with AVX2, 64 with
    AVX-512). ``Int4Weight.dequantize`` relies on the layout, so find B once per process (0: unknown)."""
    global _ROW_BLOCK
    if _ROW_BLOCK is None:
        n = k = 128
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        _ROW_BLOCK = 0
        for block in (32, 64):
            if tuple(packed.shape) == (n, k // 2) and torch.equal(_unpack(packed, n, k, block), codes.to(torch.uint8)):
                _ROW_BLOCK = block
                break
    return _ROW_BLOCK


def _unpack(packed: torch.Tensor, n: int, k: int, block: int | None = None) -> torch.Tensor:
    """Codes [n, k] (uint8) from torch's CPU int4 pack (layout: see ``row_block``)."""
    block = block or row_block()
    p = packed.reshape(n // block, k, block // 2)
    both = torch.stack([p & 0x0F, p >> 4], dim=2)  # [blocks, k, 2, B/2]: rows i and i + B/2
    return both.reshape(n // block, k, block).transpose(1, 2).reshape(n, k)


class Int4Weight:
    """One [N, K] matrix in torch's int4 pack with bfloat16 (scale, zero) per 32 values.

    Codes of up to 8 bits are split into two 4-bit planes laid side by side along K (code = 16*hi + lo),
    and the input is repeated to match: the kernel reads 2K codes but every value stays exact."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int = 4):
        self.shape = tuple(codes.shape)
        self.planes = 1 if bits <= 4 else 2
        # exact float32 step/offset for dequantizing (large batches); the kernel gets bfloat16 copies
        self.step, self.offset = step.float().contiguous(), offset.float().contiguous()
        self.shift = 0
        if self.planes == 1:  # w = (c - 8) * step + (offset + 8 * step)
            codes, scale, zero = codes, step, offset + 8 * step
        else:
            # hi plane (h - 8 + shift) * 16 step, lo plane (l - 8) * step + zero_lo; a 1-bit hi plane (5-bit
            # codes) is shifted to codes 8-9 so zero_lo = offset + 8 step stays small, like an int4 zero:
            # bfloat16 rounds a zero relative to its size, so a large one would cost accuracy
            shift = self.shift = 8 if bits <= 5 else 0
            codes = torch.cat([(codes >> 4) + shift, codes & 0x0F], dim=1)
            scale = torch.cat([16 * step, step], dim=1)
            zero = torch.cat([torch.zeros_like(offset), offset + (8 + 16 * (8 - shift)) * step], dim=1)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    @classmethod
    def concat(cls, parts: list["Int4Weight"]) -> "Int4Weight":
        """Row blocks stacked along N (torch's int4 layout is a sequence of 32-row blocks)."""
        w = cls.__new__(cls)
        w.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        w.planes, w.shift = parts[0].planes, parts[0].shift
        w.step = torch.cat([p.step for p in parts])
        w.offset = torch.cat([p.offset for p in parts])
        w.packed = torch.cat([p.packed for p in parts])
        w.scales_zeros = torch.cat([p.scales_zeros for p in parts], dim=1)
        return w

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [N, K] as float32, exactly as GGUF decodes it (code * step + offset with the float32
        step and offset, not the kernel's bfloat16 ones), into `out` if given."""
        n, k = self.shape
        kp = k * self.planes
        codes = _unpack(self.packed, n, kp)
        w = (out if out is not None else torch.empty(n * k, dtype=torch.float32)).view(n, k)
        if self.planes == 1:
            w.copy_(codes)
        else:  # code = 16 * (hi - shift) + lo
            w.copy_(codes[:, :k]).sub_(self.shift).mul_(16).add_(codes[:, k:])
        w3 = w.view(n, k // GROUP, GROUP)
        w3.mul_(self.step[..., None]).add_(self.offset[..., None])
        return w

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flat(x)
        if x2.shape[0] <= SMALL_BATCH:
            xb = x2.to(torch.bfloat16)
            if self.planes == 2:
                xb = torch.cat([xb, xb], dim=1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros)
        else:
            y = F.linear(x2.float(), self.dequantize(_buffer(self.shape[0] * self.shape[1])))
        return y.to(x.dtype).reshape(*lead, self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes + self.step.nbytes + self.offset.nbytes


# ---------------------------------------------------------------------------------------------- int8


def _rows_stacked(cls, parts, codes=None):
    """A new `cls` whose codes and per-row scales are those of `parts`, one after the other (`codes`: the
    parts' codes where they are not plain ``p.codes``)."""
    w = cls.__new__(cls)
    w.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    codes = codes if codes is not None else [p.codes for p in parts]
    w.codes = torch.cat(codes, out=huge_empty((w.shape[0], *codes[0].shape[1:]), codes[0].dtype))
    w.scale = torch.cat([p.scale for p in parts])
    return w


class Int8Weight:
    """One [N, K] matrix as int8 codes with one float scale per row (w ~ code * scale)."""

    def __init__(self, w: torch.Tensor):
        w = w.float()
        amax = w.abs().amax(dim=1).clamp_min(1e-30)
        self.scale = (amax / 127).to(torch.bfloat16).float()  # bf16: the kernel takes scales in x's dtype
        self.codes = torch.round(w / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.shape = tuple(w.shape)
        self._scale_bf16 = self.scale.to(torch.bfloat16)

    @classmethod
    def concat(cls, parts: list["Int8Weight"]) -> "Int8Weight":
        w = _rows_stacked(cls, parts)
        w._scale_bf16 = w.scale.to(torch.bfloat16)
        return w

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k = self.shape
        w = (out if out is not None else torch.empty(n * k, dtype=torch.float32)).view(n, k)
        return w.copy_(self.codes).mul_(self.scale[:, None])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flat(x)
        if x2.shape[0] <= SMALL_BATCH:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.codes, self._scale_bf16)
        else:
            y = F.linear(x2.float(), self.dequantize(_buffer(self.shape[0] * self.shape[1])))
        return y.to(x.dtype).reshape(*lead, self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


# ---------------------------------------------------------------------------------------------- vnni


PREPACK_ROWS = 32768  # rows from which a vnni matrix is laid out for oneDNN (output heads; see maybe_prepack)
_ZP128 = torch.tensor(128, dtype=torch.long)
CHUNK_ROWS = 8192  # output rows per _int_mm call: a 202k-row head in one call runs ~20% below the memory bandwidth


def quantize_rows(x: torch.Tensor, keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 codes [M, K], float32 scale [M] (or [M, 1])) with x ~ code * scale, |code| <= 127.

    No clamp is needed: |x| * (127 / max|x|) rounds to at most 127. Few ops on purpose: at one token per step
    this runs once per distinct matmul input, and each torch op costs microseconds."""
    xf = x if x.dtype == torch.float32 else x.float()
    amax = torch.linalg.vector_norm(xf, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)
    codes = (xf * (127.0 / amax)).round_().to(torch.int8)
    scale = amax.div_(127.0)
    return codes, scale if keepdim else scale[:, 0]


def rescale(product: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer products [M, N] (int32, or already float32) -> the matmul's output in `dtype`: times the input
    rows' scales [M, 1], then the weight rows' [N]. The compiled decode step calls this too, so both modes
    round in the same order (the same bits)."""
    y = (product * x_scale).mul_(w_scale)  # int32 * float32 -> float32
    return y if dtype == torch.float32 else y.to(dtype)


class QuantizedInput:
    """A matmul input quantized once (quantize_rows) for every VnniWeight that reads it (q/k/v, gate/up)."""

    def __init__(self, x: torch.Tensor):
        x2, self.lead = _flat(x)
        self.dtype = x.dtype
        self.codes, self.scale = quantize_rows(x2, keepdim=True)  # scale [M, 1]


class VnniWeight:
    """One [N, K] matrix as int8 codes with one float32 scale per row, multiplied against int8-quantized
    input rows by ``torch._int_mm`` or, for output heads, oneDNN's int8 linear (``maybe_prepack``)."""

    _qpacked = None  # oneDNN's own layout of the codes, for very tall matrices (see maybe_prepack)

    def __init__(self, w: torch.Tensor):
        self.codes, self.scale = quantize_rows(w)
        self.shape = tuple(w.shape)
        self._codes_t = self.codes.t()

    def plain_codes(self) -> torch.Tensor:
        """The int8 codes [N, K] (which a matrix prepacked for oneDNN no longer keeps)."""
        if self.codes is None:
            raise ValueError("a prepacked VnniWeight keeps no plain codes")
        return self.codes

    @classmethod
    def concat(cls, parts: list["VnniWeight"]) -> "VnniWeight":
        """Rows of `parts` stacked into one matrix."""
        w = _rows_stacked(cls, parts, [p.plain_codes() for p in parts])
        w._codes_t = w.codes.t()
        return w

    @classmethod
    def fuse(cls, parts: list["VnniWeight"]) -> "VnniWeight":
        """``concat``, then each part re-pointed at its rows of the result (views): matmuls that read one
        input run as one call without keeping a second copy of the weights (only hooked or adapted modules
        call a part on its own)."""
        fused = cls.concat(parts)
        start = 0
        for p in parts:
            n = p.shape[0]
            p.scale = fused.scale[start : start + n]
            p.codes = fused.codes[start : start + n]
            p._codes_t = p.codes.t()
            start += n
        return fused

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k = self.shape
        w = (out if out is not None else torch.empty(n * k, dtype=torch.float32)).view(n, k)
        return w.copy_(self.plain_codes()).mul_(self.scale[:, None])

    def maybe_prepack(self) -> None:
        """For a matrix of at least PREPACK_ROWS rows (an output head) on a CPU with VNNI, lay the codes out
        once for oneDNN's int8 linear and drop the plain copy: a 202k-row head then streams at ~1.3x the
        speed of ``_int_mm`` (which re-blocks the weight on every call); for smaller matrices the per-call
        cost of that op is higher than what it saves. Its input is quantized per tensor, not per row: the
        same thing for one row, and nearly so for the few RMS-normed rows of a batched decode step."""
        op = getattr(torch.ops.onednn, "qlinear_prepack", None)
        if self.shape[0] < PREPACK_ROWS or not has_int8_dot() or op is None:
            return
        self._qpacked = op(self.codes, [1, self.shape[1]])
        self._zeros = torch.zeros(self.shape[0], dtype=torch.long)
        self.codes = self._codes_t = None

    def _linear_prepacked(self, xf: torch.Tensor) -> torch.Tensor:
        """[M, K] float32 -> [M, N] float32."""
        scale = torch.linalg.vector_norm(xf, float("inf")).clamp_min_(1e-30).div_(127.0)  # one scale: per tensor
        xq = torch.round(xf / scale).add_(128).to(torch.uint8)  # uint8 with zero point 128: codes -127..127
        return torch.ops.onednn.qlinear_pointwise.tensor(xq, scale, _ZP128, self._qpacked, self.scale, self._zeros,
                                                         None, 1.0, 0, torch.float32, "none", [], "")

    def linear(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        if self._qpacked is not None:
            if isinstance(x, QuantizedInput):
                raise ValueError("a prepacked VnniWeight takes the unquantized input")
            x2, lead = _flat(x)  # the prepacked op takes float32 rows and quantizes them itself
            y = self._linear_prepacked(x2 if x2.dtype == torch.float32 else x2.float())
            return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, self.shape[0])
        q = x if isinstance(x, QuantizedInput) else QuantizedInput(x)
        n = self.shape[0]
        if n <= CHUNK_ROWS:
            y = torch._int_mm(q.codes, self._codes_t)
        else:
            y = torch.empty(q.codes.shape[0], n, dtype=torch.float32)
            for i in range(0, n, CHUNK_ROWS):
                y[:, i : i + CHUNK_ROWS] = torch._int_mm(q.codes, self._codes_t[:, i : i + CHUNK_ROWS])
        return rescale(y, q.scale, self.scale, q.dtype).view(*q.lead, n)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scale.nbytes  # int8 codes, in whichever layout


# ---------------------------------------------------------------------------------------------- dense bf16


PLAIN_CHUNK_ROWS = 8192  # rows of a plain-layout bf16 matrix per oneDNN call (bounds its per-call re-layout copy)


def _bf16_linear(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """oneDNN's bf16 linear on a prepacked matrix, or on a plain row-major one (``PackedBF16.use_plain``):
    oneDNN then lays the weight out again on every call, into a temporary as large as the weight, so a tall
    matrix (a 202k-row head: 414 MB) goes in slices of PLAIN_CHUNK_ROWS rows."""
    op = torch.ops.mkldnn._linear_pointwise
    n = matrix.shape[0]
    if matrix.layout == torch._mkldnn or n <= PLAIN_CHUNK_ROWS:
        return op(x, matrix, None, "none", [], "")
    y = x.new_empty(*x.shape[:-1], n)
    for i in range(0, n, PLAIN_CHUNK_ROWS):
        y[..., i : i + PLAIN_CHUNK_ROWS] = op(x, matrix[i : i + PLAIN_CHUNK_ROWS], None, "none", [], "")
    return y


class PackedBF16:
    """A dense bfloat16 weight ([N, K], or an [E, N, K] expert stack) re-laid out once per matrix (per expert:
    on first use) for oneDNN's bf16 matmul; the results are bit-identical to ``F.linear``. ``linear`` returns
    None where it does not apply (fast paths off, input not bfloat16, weight being trained): callers fall
    back to ``F.linear``."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self._packed: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _matrix(self, expert: int) -> torch.Tensor:
        packed = self._packed.get(expert)
        if packed is None:
            with self._lock:
                packed = self._packed.get(expert)
                if packed is None:
                    w = self.weight[expert] if self.weight.dim() == 3 else self.weight
                    # oneDNN's layout for an unknown batch, not the one for batch 1: the same bits, and faster at
                    # one row too (measured: layer-sized matrices 3-7% per pass, the 202k-row head 0-13%)
                    with building_weights():
                        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
                        huge_pages(packed)
                    self._packed[expert] = packed
                    release_pages(w)  # a memory-mapped (GGUF) weight's pages: the packed copy serves matmuls
        return packed

    @staticmethod
    def _applies(x: torch.Tensor, packs: list["PackedBF16"]) -> bool:
        return _enabled and x.dtype == torch.bfloat16 and x.device.type == "cpu" \
            and not any(p.weight.requires_grad for p in packs)

    def linear(self, x: torch.Tensor, expert: int = 0) -> torch.Tensor | None:
        if not self._applies(x, [self]):
            return None
        return _bf16_linear(x, self._matrix(expert))

    def prepare(self) -> None:
        for e in range(self.weight.shape[0] if self.weight.dim() == 3 else 1):
            self._matrix(e)

    @staticmethod
    def linears(x: torch.Tensor, packs: list["PackedBF16"], expert: int = 0) -> list[torch.Tensor] | None:
        """[p.linear(x, expert) for p in packs] as one matmul over the weights' rows stacked (q/k/v, gate/up:
        one input; fewer, larger calls run closer to the memory bandwidth). The stacked layout is built on
        first use and replaces the parts' own. None where ``linear`` would be."""
        if not PackedBF16._applies(x, packs):
            return None
        fused = PackedBF16.fused_form(packs, expert)
        y = _bf16_linear(x, fused._packed[0])
        return list(y.split(fused.sizes, dim=-1))

    @staticmethod
    def use_plain(packs: list["PackedBF16"], matrix: torch.Tensor, expert: int = 0) -> None:
        """Serve the parts' products (expert `expert` of stacks) from `matrix`, their rows stacked in the
        plain row-major layout, instead of oneDNN's: the compiled decode step reads such a copy itself
        (runtime/compiled.py), and one copy is enough. oneDNN takes plain weights too, at a per-call cost
        (one row: ~2.5x; 256 rows: ~6%)."""
        if len(packs) == 1:
            with packs[0]._lock:
                packs[0]._packed[expert] = matrix
        else:
            PackedBF16.fused_form(packs, expert, plain=matrix)

    @staticmethod
    def fused_form(packs: list["PackedBF16"], expert: int = 0, plain: torch.Tensor | None = None) -> "PackedBF16":
        """The packed matrix of the parts' rows stacked (expert `expert` of stacks), built on first use; it
        replaces the parts' own packed matrices. With `plain` (those rows stacked, row-major: see
        ``use_plain``) that matrix serves instead, and no oneDNN layout is built."""
        first = packs[0]
        key = (tuple(id(p) for p in packs), expert)
        fused = first.__dict__.setdefault("_fused", {}).get(key)
        if fused is None or plain is not None:
            with first._lock:
                fused = first._fused.get(key)
                if fused is None:
                    rows = [p.weight[expert] if p.weight.dim() == 3 else p.weight for p in packs]
                    if plain is not None:
                        fused = PackedBF16(plain)
                        fused._packed[0] = plain
                    else:
                        with building_weights():
                            fused = PackedBF16(torch.cat(rows))
                            fused.prepare()
                    fused.sizes = [r.shape[0] for r in rows]
                    fused.weight = None  # the stacked copy was only needed to lay out the packed one
                    for p in packs:
                        p._packed.pop(expert, None)
                    first._fused[key] = fused
                elif plain is not None:
                    fused._packed[0] = plain
        return fused


def shared_input_groups(model: torch.nn.Module):
    """(module, names, expert) for every set of matmul weights that always read one input: q/k/v of an
    attention, gate/up of a SwiGLU, gate/up of each routed expert (transformers' Llama 4 names)."""
    for m in model.modules():
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj")):
            yield m, ("q_proj", "k_proj", "v_proj"), None
        elif hasattr(m, "gate_proj") and hasattr(m, "up_proj"):
            if isinstance(m.gate_proj, torch.nn.Module):
                yield m, ("gate_proj", "up_proj"), None
            else:  # expert stacks [E, out, in]
                for e in range(m.gate_proj.shape[0]):
                    yield m, ("gate_proj", "up_proj"), e


def prepare_fused(model: torch.nn.Module, pack_bf16: bool = True) -> None:
    """Build now the fused forms ``layers.linears`` would build on first use (so that work is load time);
    those of dense bfloat16 weights only with `pack_bf16`."""
    from .qtensor import QTensor

    for m, names, expert in shared_input_groups(model):
        parts = [getattr(m, n) for n in names]
        if expert is None:  # Linear modules
            packs = [p.__dict__.get("_packed", {}).get("weight") for p in parts]
            weights = [p.weight for p in parts]
        else:
            packs = [m.__dict__.get("_packed", {}).get(n) for n in names]
            weights = parts
        if all(p is not None for p in packs):
            if pack_bf16:
                PackedBF16.fused_form(packs, expert or 0)
        elif all(isinstance(w, QTensor) for w in weights):
            QTensor.fused_form(weights, expert or 0)


# ---------------------------------------------------------------------------------------------- building


BUILD_ROWS = 4096  # rows repacked at a time: bounds the temporaries (int32 codes) for a 202k-row output head


_libc = None


def _c_library():
    """glibc, or False where there is none (then the memory hints below do nothing)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.mallopt  # glibc, not some other C library
        except (OSError, AttributeError):
            _libc = False
    return _libc


# glibc's malloc is tuned for the phase the process is in (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, fixed values,
# which also stops glibc's own adaptive threshold):
# - building weights (repacking, laying out, stacking): large temporaries are allocated between long-lived
#   weights. Served from the heap, their freed holes stay resident (measured: 3.2 GB instead of 1.4 GB for the
#   Q4_K_M bench model), so everything from 1 MiB up is its own mapping, returned when freed.
# - prefill (a forward over many tokens, ``large_temporaries``): its large temporaries (int8 inputs, rescaled
#   products, attention scores) are freed and allocated again in every layer. As fresh mappings each costs
#   page faults on first touch (measured on the Q4_K_M bench model, 256-token prefill: 312 ms with the 1 MiB
#   threshold, ~200 ms with these), so they stay in the heap up to 32 MiB (glibc's own ceiling), and up to
#   512 MiB of free heap top is kept.
# - otherwise (decode steps): the build values. Measured on the same model, compiled decode: 58-60 tok/s with
#   them, 50-53 with the prefill ones (the heap's reuse of a step's small buffers costs more than it saves).
_BUILD_MALLOC = (1 << 20, 128 << 10)  # (mmap threshold, trim threshold): glibc's defaults for trimming
_PREFILL_MALLOC = (32 << 20, 512 << 20)
_building = _prefilling = 0  # open blocks of each phase (nested, or on several threads)
_applied: tuple[int, int] | None = None  # the values last given to glibc (None: glibc's own adaptive ones)
_phase_lock = threading.Lock()


def _apply_malloc_phase() -> None:
    """Give glibc the values of the phase the open blocks make (a build wins over a prefill around it)."""
    global _applied
    values = _PREFILL_MALLOC if _prefilling and not _building else _BUILD_MALLOC
    if values == _applied or not _c_library():
        return
    _libc.mallopt(-3, values[0])  # M_MMAP_THRESHOLD
    _libc.mallopt(-1, values[1])  # M_TRIM_THRESHOLD
    _applied = values
    if values == _BUILD_MALLOC:
        # what a heap-keeping phase (herd's or glibc's adaptive one) left free goes back to the system: else
        # weights built next would be served from it and pin it, and decode steps start from a small heap
        _libc.malloc_trim(0)


@contextlib.contextmanager
def _malloc_phase(counter: str):
    with _phase_lock:
        globals()[counter] += 1
        _apply_malloc_phase()
    try:
        yield
    finally:
        with _phase_lock:
            globals()[counter] -= 1
            _apply_malloc_phase()


def large_temporaries():
    """Within this block a forward pass over many tokens runs (see the malloc phases above). A build inside
    it still gets the build phase."""
    return _malloc_phase("_prefilling")


def building_weights():
    """Within this block long-lived weights are built (see the malloc phases above); the build phase lasts
    until the last open block ends."""
    return _malloc_phase("_building")


_PAGE, _HUGE = 4096, 2 << 20  # x86-64's base page and transparent huge page
_huge_pages_on = env_switch("HERD_HUGE_PAGES", True)


def _madvise(start: int, end: int, advice: int, align: int = _PAGE, outward: bool = False) -> bool:
    """madvise over the `align`-sized pages inside [start, end) (or, `outward`, touching it); -> whether it
    succeeded (False also when there is no glibc or no whole page). Errors are the caller's to ignore."""
    libc = _c_library()
    if outward:
        first, last = start // align * align, -(-end // align) * align
    else:
        first, last = -(-start // align) * align, end // align * align
    if not libc or last <= first:
        return False
    import ctypes

    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice) == 0


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) addresses of t's bytes; oneDNN's opaque layouts (prepacked weights) included."""
    if t.layout == torch._mkldnn:
        start = torch.ops.mkldnn.data_ptr(t)
        return start, start + torch.ops.mkldnn._nbytes(t)
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def release_pages(t: torch.Tensor) -> None:
    """Tell the kernel the memory-mapped pages under `t` are not needed soon (MADV_PAGEOUT, Linux 5.4+): a
    weight's GGUF blocks once its repacked form exists. Clean file pages are dropped and read again if the
    blocks are used later (exact decoding); anonymous memory is never discarded, so this is always safe."""
    if t.numel():
        _madvise(*_span(t), 21)  # MADV_PAGEOUT, whole pages inside t only; errors ignored


def huge_pages(t: torch.Tensor | None) -> None:
    """Back a long-lived repacked weight with 2 MiB pages (MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+: a
    synchronous copy into huge pages, ~0.5 GB/s). Streaming a matrix then takes a TLB entry per 2 MiB, not per
    4 KiB: measured on the AVX-512 bench machine, a 202k x 1024 bf16 GEMV 3-5% faster, a float32 sum 6-12%.
    Only the 2 MiB-aligned interior of `t` is advised; any error (older kernel, THP off) leaves it as it was.
    For memory herd fills itself, ``huge_empty`` gets the same without the copy. ``HERD_HUGE_PAGES=0`` turns
    it off."""
    if t is None or not _huge_pages_on:
        return
    span = _span(t)
    _madvise(*span, 14, _HUGE)  # MADV_HUGEPAGE
    _madvise(*span, 25, _HUGE)  # MADV_COLLAPSE


def huge_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) for a long-lived weight that herd fills itself, placed at a 2 MiB boundary
    and advised MADV_HUGEPAGE before its first write: every whole 2 MiB of it then faults in as one huge
    page (no copy, unlike ``huge_pages`` on memory already written). The slack before the boundary is never
    touched, so it costs address space, not memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _c_library() or not _huge_pages_on or nbytes < _HUGE:
        return torch.empty(shape, dtype=dtype)
    with building_weights():  # a mapping of its own: heap memory may already be faulted in as 4 KiB pages
        raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % _HUGE
    t = raw[skip : skip + nbytes].view(dtype).view(shape)
    _madvise(*_span(t), 14, _HUGE)  # MADV_HUGEPAGE
    return t


def populate_pages(t: torch.Tensor) -> bool:
    """Read the memory-mapped pages under `t` in now and map them (MADV_POPULATE_READ, Linux 5.14+; else
    MADV_WILLNEED, a read-ahead hint): an embedding table, whose rows are looked up one per decoded token, at
    random. A row whose page is not yet in memory costs a disk read in the middle of a step (measured on the
    BF16 bench model: 0.2-2 ms per new token, 1-7% of a step); llama.cpp reads the whole file at load for the
    same reason. -> whether the pages are now mapped (False: only hinted, or no glibc)."""
    if t.numel() == 0:
        return False
    span = _span(t)
    if _madvise(*span, 22, outward=True):  # MADV_POPULATE_READ
        return True
    _madvise(*span, 3, outward=True)  # MADV_WILLNEED
    return False


def build(path: str, blocks: torch.Tensor, qtype, shape: tuple[int, int]):
    """The repacked form of one [out, in] matrix given its GGUF blocks [out, row_bytes]."""
    with building_weights():
        return _build(path, blocks, qtype, shape)


def _build(path: str, blocks: torch.Tensor, qtype, shape: tuple[int, int]):
    if path in ("int4", "int4x2"):
        bits = CODE_BITS[formats.format_of(qtype).qtype]
        parts = [Int4Weight(*affine_parts(blocks[i : i + BUILD_ROWS], qtype), bits=bits)
                 for i in range(0, shape[0], BUILD_ROWS)]
        return parts[0] if len(parts) == 1 else Int4Weight.concat(parts)
    if path == "vnni":  # filled slab by slab in place: no second copy of a 202k-row head while building
        w = VnniWeight.__new__(VnniWeight)
        w.shape = tuple(shape)
        w.codes, w.scale = huge_empty(shape, torch.int8), torch.empty(shape[0], dtype=torch.float32)
        for i in range(0, shape[0], BUILD_ROWS):
            rows = min(BUILD_ROWS, shape[0] - i)
            w.codes[i : i + rows], w.scale[i : i + rows] = quantize_rows(
                formats.dequantize(blocks[i : i + rows], qtype, (rows, shape[1])))
        w._codes_t = w.codes.t()
        w.maybe_prepack()
        huge_pages(w._qpacked)  # oneDNN's copy of a tall matrix (its plain codes came from huge_empty)
        return w
    if path == "kquant":
        from .native import KQuantWeight

        return KQuantWeight.build(blocks, qtype, shape)
    if path == "int8":
        parts = [Int8Weight(formats.dequantize(blocks[i : i + BUILD_ROWS], qtype, (min(BUILD_ROWS, shape[0] - i), shape[1])))
                 for i in range(0, shape[0], BUILD_ROWS)]
        return parts[0] if len(parts) == 1 else Int8Weight.concat(parts)
    raise ValueError(f"no repacked form for path {path!r}")


def select_paths(model: torch.nn.Module, eager: bool = False, progress: bool = False,
                 pack_bf16: bool = True) -> dict[str, int]:
    """Give every quantized weight of `model` its path (repacked lazily on first use, or now if `eager`);
    -> how many weights took each path. Dense bfloat16 weights get oneDNN's layout the same way, now only
    with `pack_bf16` (the compiled decode step gives them a plain copy instead: one copy, not two). Does
    nothing while the fast paths are disabled, but read embedding tables in (``populate_pages``)."""
    with building_weights():
        return _select_paths(model, eager, progress, pack_bf16)


def _select_paths(model: torch.nn.Module, eager: bool, progress: bool, pack_bf16: bool) -> dict[str, int]:
    from .qtensor import QTensor

    from ..model.layers import Embedding

    # an embedding table only has rows looked up (take_rows): no matmul path, unless it is also the output
    lookups_only = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
    matmul = {id(w) for m in model.modules() if not isinstance(m, Embedding) for w in vars(m).values()}
    weights = [w for m in model.modules() for w in vars(m).values()
               if isinstance(w, QTensor) and (id(w) not in lookups_only or id(w) in matmul)]
    for m in model.modules():  # tables read a row per token: in memory before the first step needs one
        if isinstance(m, Embedding) and id(m.weight) not in matmul:
            populate_pages(m.weight.data)
    counts: dict[str, int] = {}
    if not _enabled:
        return counts
    if has_bf16_dot():  # dense bf16 matmul weights (Linear layers, expert stacks): oneDNN's layout
        for m in model.modules():
            if isinstance(m, Embedding):
                continue
            for name, w in list(m._parameters.items()):
                if w is not None and w.dtype == torch.bfloat16 and w.dim() in (2, 3) and w.device.type == "cpu" \
                        and not w.requires_grad and (w.dim() == 3 or name == "weight"):
                    packs = m.__dict__.setdefault("_packed", {})
                    if name not in packs or packs[name].weight is not w:  # a second call keeps what is built
                        packs[name] = PackedBF16(w)
                    counts["onednn-bf16"] = counts.get("onednn-bf16", 0) + 1
    if eager and progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc="repacking", unit="tensor", leave=False)
    for w in weights:
        path = w.use_fast_path()
        counts[path] = counts.get(path, 0) + 1
        if eager:
            w.prepare()
    if eager:  # fused groups first, then every packed weight that is not part of one
        prepare_fused(model, pack_bf16)
        if not pack_bf16:
            return counts
        fused = set()  # (id of the module holding the pack, parameter name) of every fused part
        for m, names, expert in shared_input_groups(model):
            fused.update((id(m), n) if expert is not None else (id(getattr(m, n)), "weight") for n in names)
        for m in model.modules():
            for name, pack in m.__dict__.get("_packed", {}).items():
                if (id(m), name) not in fused:
                    pack.prepare()
    return counts

__all__ = ["PATHS", "SMALL_BATCH", "Int4Weight", "Int8Weight", "VnniWeight", "QuantizedInput", "has_int8_dot", "quantize_rows", "exact", "release_pages", "populate_pages", "huge_pages", "PackedBF16", "has_bf16_dot", "prepare_fused", "shared_input_groups", "enabled", "set_enabled", "path_for",
           "affine_parts", "build", "building_weights", "large_temporaries", "select_paths"]

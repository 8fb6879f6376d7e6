"""A weight kept in its GGUF block format: raw bytes (a view into the memory-mapped file) + type + shape.

Matmuls dequantize only what they need, one slab of rows at a time (at most ``SLAB_ELEMENTS`` values), so
a call's extra memory is bounded by one slab however big the weight is, and a quantized model's resident
memory stays close to its file size plus activations. For an expert stack [E, out, in], ``expert_linear``
touches only expert e's blocks; for an embedding table, ``take_rows`` decodes only the looked-up rows.
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError
from . import formats

# Values dequantized per slab: big enough for an efficient GEMM, small enough to stay cache-friendly (8 MiB f32).
SLAB_ELEMENTS = 1 << 21
_SCRATCH = threading.local()


def as_uint8_tensor(data) -> torch.Tensor:
    """A torch uint8 view of a (possibly read-only, memory-mapped) numpy array or buffer, without a copy."""
    if isinstance(data, torch.Tensor):
        return data if data.dtype == torch.uint8 else data.contiguous().view(torch.uint8)
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only mmap: nothing ever writes through this view
        return torch.from_numpy(arr)


class QTensor:
    """Quantized weight of logical shape [out, in] or [E, out, in]; rows run along `in`, as GGUF stores them.

    ``data`` is uint8 [rows, row_bytes] with rows = prod(shape[:-1]) (for experts: expert e's rows are
    e*out .. (e+1)*out - 1)."""

    def __init__(self, data, qtype, shape: tuple[int, ...]):
        self.format = formats.format_of(qtype)
        self.qtype = self.format.qtype
        self.shape = tuple(int(d) for d in shape)
        if not self.shape or any(d <= 0 for d in self.shape):
            raise FormatError(f"{self.format.name} tensor with shape {list(self.shape)}")
        row_len = self.shape[-1]
        if row_len % self.format.block_size:
            raise FormatError(
                f"{self.format.name} tensor with rows of {row_len} (not a multiple of {self.format.block_size})"
            )
        self.row_bytes = row_len // self.format.block_size * self.format.type_size
        rows = math.prod(self.shape[:-1])
        raw = as_uint8_tensor(data).reshape(-1)
        if raw.numel() != rows * self.row_bytes:
            raise FormatError(
                f"{self.format.name} tensor of shape {list(self.shape)} needs {rows * self.row_bytes} bytes, got {raw.numel()}"
            )
        self.data = raw.view(rows, self.row_bytes)
        self._fast_path: str | None = None  # set by kernels.select_paths at load; None = decode blocks
        self._fast: dict[int, object] = {}  # expert (0 for a 2-D weight) -> repacked form, built on first use
        self._fast_lock = threading.Lock()
        self._fused: dict[tuple, object] = {}  # (ids of weights read with this one, expert) -> fused form

    @classmethod
    def quantize(cls, x: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> "QTensor":
        """Encode a float tensor [.., in] (e.g. for tests or on-the-fly quantization)."""
        shape = tuple(x.shape)
        if importance is not None and len(shape) == 3 and torch.as_tensor(importance).dim() == 2:
            # one importance vector per expert ([E, in], as imatrices hold them) -> one per row of the stack
            importance = torch.as_tensor(importance)[:, None, :].expand(shape).reshape(-1, shape[-1])
        blocks = formats.quantize(x.detach().float().reshape(-1, shape[-1]).contiguous(), qtype, importance=importance)
        return cls(blocks, qtype, shape)

    # ------------------------------------------------------------------ tensor-like info
    @property
    def dtype(self) -> torch.dtype:
        """The dtype values decode to (and what callers should treat the weight as)."""
        return torch.float32

    @property
    def type_name(self) -> str:
        return self.format.name

    @property
    def bits_per_weight(self) -> float:
        return self.format.bits_per_weight

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device=None, dtype=None) -> "QTensor":
        """The same blocks on another device (a copy); `dtype` is ignored (blocks stay quantized)."""
        if isinstance(device, torch.dtype):
            device = None
        if device is None or torch.device(device) == self.data.device:
            return self
        return QTensor(self.data.to(device), self.qtype, self.shape)

    def cpu(self) -> "QTensor":
        return self.to("cpu")

    # ------------------------------------------------------------------ decode
    def _decode(self, first: int, count: int) -> torch.Tensor:
        """Rows [first, first + count) of the flattened [rows, in] weight, as float32."""
        return formats.dequantize(self.data[first : first + count], self.qtype, (count, self.shape[-1]))

    def dequantize(self, rows=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoded values: all of them in `shape` (rows=None), or rows of the flattened [rows, in] weight
        given as a slice or an int (-> [n, in] / [in])."""
        if isinstance(rows, torch.dtype):  # dequantize(torch.bfloat16)
            rows, dtype = None, rows
        if rows is None:
            return self._decode(0, self.data.shape[0]).reshape(self.shape).to(dtype)
        if isinstance(rows, int):
            n = self.data.shape[0]
            if not -n <= rows < n:
                raise IndexError(f"row {rows} out of range for {n} rows")
            return self._decode(rows % n, 1)[0].to(dtype)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.data.shape[0])
            if step != 1:
                raise ValueError("dequantize: row slices must be contiguous")
            return self._decode(start, max(0, stop - start)).to(dtype)
        ids = torch.as_tensor(rows, dtype=torch.long, device=self.data.device).reshape(-1)
        return formats.dequantize(self.data[ids], self.qtype, (ids.numel(), self.shape[-1])).to(dtype)

    def take_rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `ids` (any shape) of a 2-D weight, decoded: an embedding lookup that touches only those rows."""
        flat = ids.reshape(-1).to(self.data.device)
        # a decode step (few ids): decoding a repeated row twice is cheaper than torch.unique
        uniq, inverse = (flat, None) if flat.numel() <= 8 else torch.unique(flat, return_inverse=True)
        rows = formats.dequantize(self.data[uniq], self.qtype, (uniq.numel(), self.shape[-1]))
        if inverse is not None:
            rows = rows[inverse]
        return rows.reshape(*ids.shape, self.shape[-1]).to(dtype)

    # ------------------------------------------------------------------ fast paths (see kernels.py)
    def use_fast_path(self) -> str:
        """Choose this weight's execution path from its type and shape; -> the path's name."""
        from . import kernels

        self._fast_path = kernels.path_for(self.qtype, self.shape) if self.data.device.type == "cpu" else "dequant"
        return self._fast_path

    def _repacked(self, expert: int):
        """The repacked form of expert `expert` (or of the whole 2-D weight), built once and cached; None when
        this weight decodes blocks."""
        from . import kernels

        if self._fast_path in (None, "dequant") or not kernels.enabled():
            return None
        fast = self._fast.get(expert)
        if fast is None:
            with self._fast_lock:
                fast = self._fast.get(expert)
                if fast is None:
                    out = self.shape[-2]
                    blocks = self.data[expert * out : (expert + 1) * out]
                    fast = self._fast[expert] = kernels.build(self._fast_path, blocks, self.qtype, self.shape[-2:])
                    kernels.release_pages(blocks)  # the repacked copy serves matmuls from now on
        return fast

    def prepare(self) -> None:
        """Repack every expert (or the whole weight) now rather than on first use."""
        for e in range(self.shape[0] if len(self.shape) == 3 else 1):
            self._repacked(e)

    # ------------------------------------------------------------------ matmuls
    @staticmethod
    def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One buffer per thread, dtype and device (shared by all weights) for a slab cast to the
        activation dtype, reused across calls."""
        bufs = _SCRATCH.__dict__.setdefault("bufs", {})
        buf = bufs.get((dtype, device))
        if buf is None or buf.numel() < numel:
            buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _rows_linear(self, x: torch.Tensor, first_row: int, n_rows: int) -> torch.Tensor:
        """x @ W[first_row : first_row + n_rows].T, slab by slab; output in x's dtype."""
        in_features = self.shape[-1]
        if x.shape[-1] != in_features:
            raise ValueError(f"linear: input has {x.shape[-1]} features, the weight {list(self.shape)} expects {in_features}")
        slab = max(1, SLAB_ELEMENTS // in_features)
        if n_rows <= slab:  # one slab: no output assembly needed
            w = self._decode(first_row, n_rows)
            return F.linear(x, w if w.dtype == x.dtype else self._scratch(w.numel(), x.dtype, x.device).view_as(w).copy_(w))
        out = torch.empty(*x.shape[:-1], n_rows, dtype=x.dtype, device=x.device)
        for start in range(0, n_rows, slab):
            stop = min(start + slab, n_rows)
            w = self._decode(first_row + start, stop - start)
            if w.dtype != x.dtype:
                w = self._scratch(w.numel(), x.dtype, x.device).view_as(w).copy_(w)
            out[..., start:stop] = F.linear(x, w)
        return out

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for a 2-D weight (W never decoded whole)."""
        if len(self.shape) != 2:
            raise ValueError(f"linear on a {len(self.shape)}-D quantized tensor (use expert_linear)")
        fast = self._repacked(0) if self._fast_path else None
        if fast is not None:
            return fast.linear(x)
        return self._rows_linear(x, 0, self.shape[0])

    def expert_linear(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """y = x @ W[expert].T for an [E, out, in] stack; only expert `expert`'s blocks are read."""
        if len(self.shape) != 3:
            raise ValueError("expert_linear needs an [E, out, in] tensor")
        if not 0 <= expert < self.shape[0]:
            raise IndexError(f"expert {expert} out of range for {self.shape[0]} experts")
        fast = self._repacked(expert) if self._fast_path else None
        if fast is not None:
            return fast.linear(x)
        out_features = self.shape[1]
        return self._rows_linear(x, expert * out_features, out_features)

    @staticmethod
    def linears(x: torch.Tensor, weights: list["QTensor"], expert: int | None = None) -> list[torch.Tensor]:
        """[x @ W.T for W in weights] (W = weight[expert] for expert stacks). Weights on the ``vnni`` path run
        as one fused matmul (their rows share one int8 matrix; see ``VnniWeight.fuse``) on one quantized x."""
        from . import kernels

        if expert is not None and not all(len(w.shape) == 3 and 0 <= expert < w.shape[0] for w in weights):
            raise IndexError(f"expert {expert} out of range, or not an expert stack")
        fused = QTensor.fused_form(weights, expert or 0)
        if fused is not None:
            return list(fused.linear(x).split(fused.sizes, dim=-1))
        return [w.linear(x) if expert is None else w.expert_linear(x, expert) for w in weights]

    @staticmethod
    def fused_form(weights: list["QTensor"], expert: int = 0):
        """The one ``VnniWeight`` (or ``native.KQuantWeight``) holding the rows of `weights` (expert `expert`
        of stacks), built on first use; None unless every weight is on the ``vnni`` path (or every one on the
        ``kquant`` path, of one type)."""
        from . import kernels, native

        key = (tuple(id(w) for w in weights), expert)
        fused = weights[0]._fused.get(key)
        if fused is not None and kernels.enabled() and all(w._fast_path in ("vnni", "kquant") for w in weights):
            # built before: the parts' repacked forms need not be looked up again (once per layer per step)
            return fused
        forms = [w._repacked(expert) if w._fast_path else None for w in weights]
        if len(forms) < 2:
            return None
        if all(isinstance(f, kernels.VnniWeight) and f._qpacked is None for f in forms):
            kind = kernels.VnniWeight
        elif all(isinstance(f, native.KQuantWeight) and f.qtype == forms[0].qtype for f in forms):
            kind = native.KQuantWeight  # one type only: a Q6_K v beside Q4_K q, k runs as its own call
        else:
            return None
        if fused is None:
            with weights[0]._fast_lock:
                fused = weights[0]._fused.get(key)
                if fused is None:
                    fused = kind.fuse(forms)
                    fused.sizes = [f.shape[0] for f in forms]
                    weights[0]._fused[key] = fused
        return fused

    def __repr__(self) -> str:
        return f"QTensor({self.format.name}, shape={list(self.shape)}, {self.nbytes:,} bytes, device={self.device})"


__all__ = ["QTensor", "SLAB_ELEMENTS", "as_uint8_tensor"]

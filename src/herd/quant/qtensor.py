"""A weight kept in its GGUF block format: raw bytes (a view into the memory-mapped file) + type + shape.

Matmuls dequantize only what they need, a slab of rows at a time, into a scratch buffer that is reused,
so a quantized model's resident memory stays close to its file size plus activations. For an expert
stack [E, out, in], ``expert_linear`` touches only the selected expert's blocks.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError
from . import formats

# Rows dequantized per slab: big enough for efficient GEMM, small enough to stay in cache-sized memory.
SLAB_ELEMENTS = 1 << 21


def as_uint8_tensor(data) -> torch.Tensor:
    """A torch uint8 view of a (possibly read-only, memory-mapped) numpy array, without a copy."""
    if isinstance(data, torch.Tensor):
        return data
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only mmap: we never write through it
        return torch.from_numpy(arr)


class QTensor:
    """Quantized weight of logical shape [out, in] or [E, out, in] (rows along `in`, as GGUF stores them)."""

    def __init__(self, data, qtype, shape: tuple[int, ...]):
        self.format = formats.format_of(qtype)
        self.qtype = self.format.qtype
        self.shape = tuple(int(d) for d in shape)
        row_len = self.shape[-1]
        if row_len % self.format.block_size:
            raise FormatError(
                f"{self.format.name} tensor with rows of {row_len} (not a multiple of {self.format.block_size})"
            )
        self.row_bytes = row_len // self.format.block_size * self.format.type_size
        rows = int(np.prod(self.shape[:-1]))
        raw = as_uint8_tensor(data).reshape(-1)
        if raw.numel() != rows * self.row_bytes:
            raise FormatError(
                f"{self.format.name} tensor of shape {list(self.shape)} needs {rows * self.row_bytes} bytes, got {raw.numel()}"
            )
        self.data = raw.view(rows, self.row_bytes)
        self._local = threading.local()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def dtype(self):  # what a caller should treat the values as
        return torch.float32

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return formats.dequantize(self.data, self.qtype, self.shape).to(dtype)

    def take_rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `ids` (any shape) of a 2-D weight, decoded: an embedding lookup that touches only those rows."""
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = formats.dequantize(self.data[uniq], self.qtype, (uniq.numel(), self.shape[-1]))
        return rows[inverse].reshape(*ids.shape, self.shape[-1]).to(dtype)

    def _rows_linear(self, x: torch.Tensor, first_row: int, n_rows: int) -> torch.Tensor:
        """x @ W[first_row : first_row + n_rows].T, slab by slab."""
        in_features = self.shape[-1]
        slab = max(1, SLAB_ELEMENTS // in_features)
        out = torch.empty(*x.shape[:-1], n_rows, dtype=x.dtype, device=x.device)
        for start in range(0, n_rows, slab):
            stop = min(start + slab, n_rows)
            w = formats.dequantize(
                self.data[first_row + start : first_row + stop], self.qtype, (stop - start, in_features)
            )
            out[..., start:stop] = F.linear(x, w.to(x.dtype))
        return out

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.shape) != 2:
            raise ValueError(f"linear on a {len(self.shape)}-D quantized tensor")
        return self._rows_linear(x, 0, self.shape[0])

    def expert_linear(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        if len(self.shape) != 3:
            raise ValueError("expert_linear needs an [E, out, in] tensor")
        out_features = self.shape[1]
        return self._rows_linear(x, expert * out_features, out_features)

    def __repr__(self) -> str:
        return f"QTensor({self.format.name}, shape={list(self.shape)}, {self.nbytes} bytes)"

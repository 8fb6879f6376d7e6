"""herd's own C++ kernels (``csrc/kquant.cpp``): Q4_K and Q6_K matrices multiplied at their own width.

The int8 path (``kernels.VnniWeight``) reads 8 bits per weight; these read the type's own 4.6 / 6.6 bits,
which is what a decode step (one row: a pass over the weights, bound by memory bandwidth) needs to keep up
with llama.cpp. The source is compiled once per machine with the C++ compiler torch.compile uses, against
torch's own headers and libraries (its OpenMP pool runs the threads), into a cache directory
(``$HERD_CACHE_DIR``, else ``~/.cache/herd``), named by a hash of the source, torch's version and the CPU's
flags; a build is written to a temporary name and renamed, so a failed or concurrent build never leaves a
broken library. Where no compiler is found or the build fails, ``available()`` is False and the int8 path
serves (one warning says why). ``HERD_KQUANT=0`` turns these kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..switches import env_switch
from . import formats
from .formats import QType

_SOURCE = Path(__file__).with_name("csrc") / "kquant.cpp"
ROWS, SUPER = 16, 256  # output rows per packed block, values per super-block
TYPES = (QType.Q4_K, QType.Q6_K)

_wanted = env_switch("HERD_KQUANT", True)
_state: dict[str, object] = {}
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cache_dir() -> Path:
    root = os.environ.get("HERD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "herd")
    return Path(root) / "kernels"


def _build(cxx: str) -> Path:
    torch_dir = Path(torch.__file__).parent
    extra = os.environ.get("HERD_KQUANT_FLAGS", "").split()  # e.g. -mno-avx512vnni: the plain loops (tests)
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode(),
                                     cxx.encode(), sys.version.encode(), " ".join(extra).encode()])).hexdigest()[:16]
    target = _cache_dir() / f"kquant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", *extra, "-std=c++20", "-fPIC", "-shared", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
           str(_SOURCE), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_dir / 'lib'}",
           "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{cxx} failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def available() -> bool:
    """Whether the kernels are built and loaded (building them on first call, ~10 s)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            ok = False
            if _wanted and sys.platform.startswith("linux"):
                cxx = _compiler()
                try:
                    if cxx is None:
                        raise RuntimeError("no C++ compiler found (set CXX)")
                    torch.ops.load_library(str(_build(cxx)))
                    ok = True
                except Exception as e:  # any failure leaves the int8 path in charge
                    warnings.warn(f"herd: K-quant kernels unavailable, using the int8 path ({e})", stacklevel=2)
            _state["ok"] = ok
    return bool(_state["ok"])


def vectorized() -> bool:
    """Whether the loaded kernels use AVX512-VNNI (else they are the plain loops: exact, but slow)."""
    return available() and bool(torch.ops.herd_kquant.vnni512())


def supports(qtype, shape: tuple[int, ...]) -> bool:
    """Whether a weight of this type and shape ([out, in] or [E, out, in]) can take these kernels."""
    return formats.format_of(qtype).qtype in TYPES and shape[-2] % ROWS == 0 and shape[-1] % SUPER == 0


# ---------------------------------------------------------------------------------------------- packing
# A packed matrix is [out/16 blocks][in/256 super-blocks] records; see csrc/kquant.cpp for each record.


def _interleave4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (0..15) -> [N/16, K/256, 2048] bytes: per 8 values of a super-block, 64 bytes with
    4 bytes per row, byte j holding values j (low nibble) and j + 4 (high nibble)."""
    n, k = codes.shape
    c = codes.view(n // ROWS, ROWS, k // SUPER, 32, 2, 4)  # block, row, super, chunk of 8, half, j
    b = c[..., 0, :] | (c[..., 1, :] << 4)
    return b.permute(0, 2, 3, 1, 4).reshape(n // ROWS, k // SUPER, 2048)


def _by_row(v: torch.Tensor, per_super: int) -> torch.Tensor:
    """[N, K/256 * per_super] values -> [N/16, K/256, per_super * 16] (for each entry, the 16 rows)."""
    n = v.shape[0]
    return v.view(n // ROWS, ROWS, -1, per_super).permute(0, 2, 3, 1).reshape(n // ROWS, -1, per_super * ROWS)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(*t.shape[:-1], -1)


def pack_q4k(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q4_K blocks [out, in/256 * 144] -> the packed matrix (uint8, flat). Exact: codes, 6-bit scales
    and mins, float16 d and dmin as stored."""
    n, k = shape
    b = blocks.reshape(n * (k // SUPER), 144)
    d, dmin = b[:, 0:2].view(torch.float16), b[:, 2:4].view(torch.float16)
    sc, mn = formats._scale_min_k4(b[:, 4:16])
    q = b[:, 16:144].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]
    codes = (q & 0x0F).reshape(n, k)  # per 64 values: 32 low nibbles, then 32 high
    parts = [_interleave4(codes), _by_row(sc.to(torch.uint8).view(n, -1), 8), _by_row(mn.to(torch.uint8).view(n, -1), 8),
             _bytes(_by_row(d.reshape(n, -1), 1)), _bytes(_by_row(dmin.reshape(n, -1), 1))]
    return torch.cat(parts, dim=-1).reshape(-1)


def pack_q6k(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q6_K blocks [out, in/256 * 210] -> the packed matrix (uint8, flat). Exact: 6-bit codes, int8
    scales per 16 values, float16 d."""
    n, k = shape
    b = blocks.reshape(n * (k // SUPER), 210)
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32) >> torch.tensor([0, 4], dtype=torch.uint8)[:, None, None]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    q = ((ql & 0x0F).reshape(-1, 2, 4, 32) | ((qh & 3) << 4)).reshape(n, k)  # 0..63, value order
    hi = (q >> 4).view(n // ROWS, ROWS, k // SUPER, 16, 4, 4)  # block, row, super, chunk of 16, i, j
    crumbs = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    crumbs = crumbs.permute(0, 2, 3, 1, 4).reshape(n // ROWS, k // SUPER, 16, 1, 64)
    lo = _interleave4(q & 0x0F).view(n // ROWS, k // SUPER, 16, 2, 64)
    codes = torch.cat([lo, crumbs], dim=3).reshape(n // ROWS, k // SUPER, 16 * 192)  # read order: lo, lo, high
    scales = b[:, 192:208].reshape(n, -1)  # int8 bytes, 16 per super-block
    d = b[:, 208:210].view(torch.float16).reshape(n, -1)
    pad = torch.zeros(n // ROWS, k // SUPER, 32, dtype=torch.uint8)  # records stay 64-byte aligned
    parts = [_by_row(scales, 16), _bytes(_by_row(d, 1)), pad, codes]
    return torch.cat(parts, dim=-1).reshape(-1)


def pack(blocks: torch.Tensor, qtype, shape: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """The packed form of one matrix (`out`: where to write it, e.g. a slice of a fused matrix)."""
    qtype = formats.format_of(qtype).qtype
    packed = (pack_q4k if qtype == QType.Q4_K else pack_q6k)(blocks, shape)
    return packed if out is None else out.copy_(packed)


def record_bytes(qtype) -> int:
    return 2368 if formats.format_of(qtype).qtype == QType.Q4_K else 3392


def packed_bytes(qtype, shape: tuple[int, int]) -> int:
    return shape[0] // ROWS * (shape[1] // SUPER) * record_bytes(qtype)


# ---------------------------------------------------------------------------------------------- weights

_WIDTH: dict[int, int] = {}  # handle -> output rows (the op's shape while torch.compile traces it)
_NO_EXPERT = torch.zeros(1, dtype=torch.long)
BUILD_ROWS = 4096  # rows packed at a time: bounds the temporaries for a 202k-row output head


def register(blobs: list[torch.Tensor], qtype, shape: tuple[int, int]) -> int:
    """Name packed matrices (one, or one per expert) for ``herd_kquant::mm``; -> the handle."""
    handle = int(torch.ops.herd_kquant.add(blobs, int(formats.format_of(qtype).qtype), shape[0], shape[1]))
    _WIDTH[handle] = shape[0]
    return handle


def unregister(handle: int) -> None:
    """Forget a handle: the C++ side lets go of its matrices."""
    torch.ops.herd_kquant.drop(handle)
    _WIDTH.pop(handle, None)


def _fake_mm(x, expert, handle):
    return x.new_empty(x.shape[0], _WIDTH[handle], dtype=torch.float32)


_fake_registered = False


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:
        torch.library.register_fake("herd_kquant::mm")(_fake_mm)
        _fake_registered = True


def product(x: torch.Tensor, handle: int, expert: torch.Tensor = _NO_EXPERT) -> torch.Tensor:
    """x [M, K] (any float dtype) times the registered matrix (the expert `expert` picks) -> float32 [M, N]."""
    return torch.ops.herd_kquant.mm(x if x.dtype == torch.float32 else x.float(), expert, handle)


class KQuantWeight:
    """One [N, K] Q4_K or Q6_K matrix in the kernels' packed layout (exact: the GGUF codes and scales)."""

    def __init__(self, blob: torch.Tensor, qtype, shape: tuple[int, int]):
        self.blob, self.qtype, self.shape = blob, formats.format_of(qtype).qtype, tuple(shape)
        self.handle = register([blob], self.qtype, self.shape)

    @classmethod
    def build(cls, blocks: torch.Tensor, qtype, shape: tuple[int, int]) -> "KQuantWeight":
        """From GGUF blocks [N, row_bytes], packed slab by slab into one allocation on 2 MiB pages."""
        from .kernels import huge_empty

        _register_fake()
        n, k = shape
        blob = huge_empty((packed_bytes(qtype, shape),), torch.uint8)
        per_row = packed_bytes(qtype, (ROWS, k)) // ROWS
        for i in range(0, n, BUILD_ROWS):
            rows = min(BUILD_ROWS, n - i)
            pack(blocks[i : i + rows], qtype, (rows, k), out=blob[i * per_row : (i + rows) * per_row])
        return cls(blob, qtype, shape)

    @classmethod
    def fuse(cls, parts: list["KQuantWeight"]) -> "KQuantWeight":
        """The parts' rows stacked into one matrix (one call for q/k/v or gate/up), each part re-pointed at
        its slice of it (no second copy). All parts must be of one type."""
        from .kernels import huge_empty

        blob = torch.cat([p.blob for p in parts], out=huge_empty((sum(p.blob.numel() for p in parts),), torch.uint8))
        fused = cls(blob, parts[0].qtype, (sum(p.shape[0] for p in parts), parts[0].shape[1]))
        start = 0
        for p in parts:
            unregister(p.handle)
            p.blob = blob[start : start + p.blob.numel()]
            p.handle = register([p.blob], p.qtype, p.shape)
            start += p.blob.numel()
        return fused

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = product(x2, self.handle)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.blob.numel()

    def __del__(self):
        try:
            unregister(self.handle)
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

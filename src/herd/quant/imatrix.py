"""Importance matrix: Σx² of every matmul weight's input columns over calibration text, with counts.

Collected as llama-imatrix does: every ``blk.*`` matmul (not the output head, not the embedding lookup),
per expert for the routed experts, whose input is the router-scaled one (Llama 4 scales the expert *input*),
and the down projections see silu(gate)·up. Files are llama.cpp's: the GGUF format (``general.type =
imatrix``, ``<name>.in_sum2`` [n_mat, ne0] and ``<name>.counts`` [n_mat, 1], both F32) and the legacy
``.dat``; both are read, so files move both ways between herd and llama-imatrix / llama-quantize.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..weights import names


@dataclass
class Entry:
    sum2: np.ndarray  # float64 [n_mat, ne0]: Σx² per input column
    counts: np.ndarray  # float64 [n_mat]: activation rows accumulated


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # GGUF tensor name -> Entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: str | None = None

    def importance(self) -> dict[str, torch.Tensor]:
        """herd canonical name -> mean squared input per column ([in], or [E, in] for expert stacks), as
        llama-quantize computes it (a matrix that saw no rows gets ones)."""
        out = {}
        for gguf_name, e in self.entries.items():
            canonical = names.from_gguf(gguf_name)
            if canonical is None:
                continue
            counts = e.counts[:, None]
            mean = np.where(counts > 0, e.sum2 / np.maximum(counts, 1), 1.0).astype(np.float32)
            value = torch.from_numpy(mean)
            out[canonical] = value if _is_expert_stack(canonical) else value[0]
        return out

    def save(self, path: str | Path) -> Path:
        """GGUF unless the name ends in .dat (legacy); written to a temp file and renamed."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            data = _legacy_bytes(self) if path.suffix == ".dat" else _gguf_bytes(self)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = str(path)
        return path


# ---------------------------------------------------------------------------------------------- collection


class _Collector:
    def __init__(self, model):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.handles = []
        self.patched = []
        for name, module in model.named_modules():
            if not name.startswith("model.layers."):
                continue
            weight = getattr(module, "weight", None)
            if type(module).__name__ == "Linear" and weight is not None and len(weight.shape) == 2:
                self._hook_linear(names.to_gguf(name + ".weight"), module)
            elif type(module).__name__ == "Experts":
                self._patch_experts(name, module)

    def _add(self, key: str, mat: int, n_mat: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64)
            self.counts[key] = torch.zeros(n_mat, dtype=torch.float64)
        self.sums[key][mat] += (x * x).sum(0)
        self.counts[key][mat] += x.shape[0]

    def _hook_linear(self, key: str, module) -> None:
        def hook(_module, inputs):
            self._add(key, 0, 1, inputs[0])

        self.handles.append(module.register_forward_pre_hook(hook))

    def _patch_experts(self, prefix: str, experts) -> None:
        from ..model.moe import expert_linear

        keys = {p: names.to_gguf(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
        n = experts.num_experts

        def run_expert(e: int, x: torch.Tensor) -> torch.Tensor:
            self._add(keys["gate_proj"], e, n, x)
            self._add(keys["up_proj"], e, n, x)
            h = F.silu(expert_linear(x, experts.gate_proj, e)) * expert_linear(x, experts.up_proj, e)
            self._add(keys["down_proj"], e, n, h)
            return expert_linear(h, experts.down_proj, e)

        experts.run_expert = run_expert  # instance attribute: shadows the method until removed
        self.patched.append(experts)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for experts in self.patched:
            del experts.run_expert


def chunk_tokens(ids: list[int], ctx: int, bos: int | None, max_chunks: int | None = None) -> list[list[int]]:
    """llama.cpp's chunking for imatrix/perplexity: consecutive windows of `ctx` tokens, the first token of
    each replaced by BOS."""
    if ctx < 2:
        raise FormatError(f"-c {ctx}: the context must hold at least 2 tokens")
    n = len(ids) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    chunks = []
    for i in range(n):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def collect_imatrix(llm, chunks: list[list[int]], progress: bool = True, dataset: str | None = None) -> Imatrix:
    """Run the model over `chunks` (lists of ids) and accumulate the statistics; shows running perplexity."""
    from tqdm import tqdm

    collector = _Collector(llm.model)
    nll, scored = 0.0, 0
    bar = tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress)
    try:
        for chunk in bar:
            ids = torch.tensor([chunk], dtype=torch.long)
            with torch.inference_mode():
                logits = llm.model(ids)[0].float()
            first = len(chunk) // 2  # llama.cpp's running perplexity scores the second half of each chunk
            logp = torch.log_softmax(logits[first:-1], dim=-1)
            target = ids[0, first + 1:]
            nll -= float(logp.gather(1, target[:, None]).sum())
            scored += len(target)
            bar.set_postfix(ppl=f"{math.exp(nll / max(scored, 1)):.2f}")
    finally:
        collector.close()
    entries = {k: Entry(collector.sums[k].numpy(), collector.counts[k].numpy()) for k in sorted(collector.sums)}
    return Imatrix(entries, [dataset] if dataset else [], len(chunks), len(chunks[0]) if chunks else 0)


# ---------------------------------------------------------------------------------------------- files


def _gguf_bytes(im: Imatrix) -> bytes:
    from ..weights.gguf_write import KV, T_STR, T_U32, _header, _Info, _pad

    kv = KV()
    kv.string("general.type", "imatrix")
    kv.array("imatrix.datasets", T_STR, list(im.datasets))
    kv.add("imatrix.chunk_count", T_U32, int(im.chunk_count))
    kv.add("imatrix.chunk_size", T_U32, int(im.chunk_size))
    infos, blobs = [], []
    for name, e in im.entries.items():
        for suffix, arr in ((".in_sum2", e.sum2), (".counts", e.counts.reshape(-1, 1))):
            data = np.ascontiguousarray(arr, dtype=np.float32)
            infos.append(_Info(name + suffix, None, tuple(data.shape), 0, data.nbytes))
            blobs.append(data.tobytes())
    head, start = _header(kv, infos)
    out = bytearray(head.ljust(start, b"\0"))
    for info, blob in zip(infos, blobs):
        out += blob.ljust(_pad(info.nbytes), b"\0")
    return bytes(out)


def _legacy_bytes(im: Imatrix) -> bytes:
    """llama-imatrix's .dat: values = mean · ncall, ncall = ceil(max count / chunk size)."""
    out = [struct.pack("<i", len(im.entries))]
    size = max(im.chunk_size, 1)
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = max(1, math.ceil(float(e.counts.max()) / size))
        counts = e.counts[:, None]
        mean = np.where(counts > 0, e.sum2 / np.maximum(counts, 1), 1.0)
        values = (mean * ncall).astype(np.float32).reshape(-1)
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    out.append(struct.pack("<i", int(im.chunk_count)))
    dataset = (im.datasets[0] if im.datasets else "").encode()
    out += [struct.pack("<i", len(dataset)), dataset]
    return b"".join(out)


def _is_expert_stack(canonical: str) -> bool:
    return ".feed_forward.experts." in canonical


def read_imatrix(path: str | Path, num_experts: int | None = None) -> Imatrix:
    """Read an imatrix file (GGUF or legacy .dat, told apart by the magic). A legacy file stores each expert
    stack as one flat vector, so splitting it needs the model's expert count (`num_experts`)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path, num_experts)
    im.path = str(path)
    return im


def _read_gguf(path: Path) -> Imatrix:
    from ..weights.gguf import GGUFFile

    f = GGUFFile(path)
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in f.fields:
            raise FormatError(f"{path}: missing imatrix metadata ({key}); not an imatrix file?")
    entries = {}
    for tname, t in f.tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        counts = f.tensors.get(base + ".counts")
        if counts is None or t.type_id != 0 or counts.type_id != 0:
            raise FormatError(f"{path}: tensor {base}: expected F32 .in_sum2 and .counts")
        sum2 = np.frombuffer(t.data, dtype=np.float32).reshape(t.canonical_shape).astype(np.float64)
        cnt = np.frombuffer(counts.data, dtype=np.float32).astype(np.float64).reshape(-1)
        if cnt.size != sum2.shape[0]:
            raise FormatError(f"{path}: tensor {base}: {cnt.size} counts for {sum2.shape[0]} matrices")
        entries[base] = Entry(sum2, cnt)
    datasets = f.fields["imatrix.datasets"]
    return Imatrix(entries, list(datasets) if isinstance(datasets, (list, tuple)) else [str(datasets)],
                   int(f.fields["imatrix.chunk_count"]), int(f.fields["imatrix.chunk_size"]))


def _read_legacy(path: Path, num_experts: int | None) -> Imatrix:
    """The .dat gives means·ncall; they come back as sum2 = mean·ncall with counts = ncall (same mean)."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise FormatError(f"{path}: truncated imatrix file at byte {pos}")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n,) = take("<i")
    if n < 0 or n > 1_000_000:
        raise FormatError(f"{path}: not an imatrix file (entry count {n})")
    entries = {}
    for _ in range(n):
        (length,) = take("<i")
        if length <= 0 or pos + length > len(raw):
            raise FormatError(f"{path}: bad entry name length {length}")
        name = raw[pos:pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(raw):
            raise FormatError(f"{path}: entry {name}: bad value count {nval}")
        values = np.frombuffer(raw, dtype=np.float32, count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        canonical = names.from_gguf(name)
        n_mat = 1
        if canonical and _is_expert_stack(canonical):
            if not num_experts or nval % num_experts:
                raise FormatError(f"{path}: entry {name}: {nval} values do not split into {num_experts} experts")
            n_mat = num_experts
        ne0 = nval // n_mat
        entries[name] = Entry(values.reshape(-1, ne0), np.full(nval // ne0, float(max(ncall, 1))))
    chunks, dataset = 0, []
    if pos + 4 <= len(raw):
        (chunks,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            dataset = [raw[pos:pos + length].decode("utf-8", "replace")]
    return Imatrix(entries, dataset, int(chunks), 0)


__all__ = ["Imatrix", "Entry", "collect_imatrix", "read_imatrix", "chunk_tokens"]

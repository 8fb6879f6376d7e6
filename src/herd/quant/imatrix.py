"""Importance matrix: for every matmul weight, Σx² of each input column over calibration text, with counts.

What is collected follows llama-imatrix (llama.cpp's tools/imatrix):

* every matmul whose weight lives in a block (``blk.N.*``): attention q/k/v/o, the router (``ffn_gate_inp``),
  the shared expert and dense FFNs; the output head only when asked (``--process-output``), never the
  embedding lookup (not a matmul);
* the routed experts per expert: a row counts for expert e when the token was routed to e, and the input is
  the one the expert sees, scaled by the router score (Llama 4 scales the expert *input*); the down projection
  sees silu(gate)·up;
* dense matmuls with fewer than 16 input rows are skipped, as llama-imatrix does (it ignores small batches);
  chunks of ≥ 16 tokens are never affected.

Files are llama.cpp's, both ways:

* GGUF (llama-imatrix's default): KV ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); per weight ``<name>.in_sum2`` F32 with ggml shape
  {ne0, n_mat} (raw Σx², one row per expert) and ``<name>.counts`` F32 {1, n_mat} (rows seen per matrix).
* legacy ``.dat``: i32 entry count; per entry i32 name length, name, i32 ncall, i32 nval, nval × f32 holding
  mean·ncall (ncall = ceil(max count / chunk size)), one flat vector for an expert stack; then i32 chunk count,
  i32 length + dataset name. Entries that saw no rows are left out; experts that saw none store 1.

llama-quantize turns either into per-column weights: Σx²/count, and 1 for a matrix that saw no rows.
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

MIN_DENSE_ROWS = 16  # llama-imatrix ignores plain matmuls over fewer rows


@dataclass
class Entry:
    sum2: np.ndarray  # float64 [n_mat, ne0]: Σx² per input column (n_mat = experts, or 1)
    counts: np.ndarray  # float64 [n_mat]: activation rows accumulated into each matrix

    def means(self) -> np.ndarray:
        """Mean x² per column, float64 [n_mat, ne0]; 1 where a matrix saw no rows (llama-quantize's rule)."""
        counts = self.counts[:, None]
        return np.where(counts > 0, self.sum2 / np.maximum(counts, 1), 1.0)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # GGUF tensor name -> Entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: str | None = None

    def importance(self) -> dict[str, torch.Tensor]:
        """herd canonical name -> mean squared input per column, float32: [in], or [E, in] for an expert
        stack (experts that saw no rows get ones, as in llama-quantize). Names herd does not know are left out."""
        out = {}
        for gguf_name, entry in self.entries.items():
            canonical = names.from_gguf(gguf_name)
            if canonical is None:
                continue
            value = torch.from_numpy(entry.means().astype(np.float32))
            out[canonical] = value if _is_expert_stack(canonical) else value[0]
        return out

    def save(self, path: str | Path) -> Path:
        """GGUF, or the legacy format when the name ends in ``.dat``; written to a temp file, then renamed."""
        path = Path(path)
        data = _legacy_bytes(self) if path.suffix == ".dat" else _gguf_bytes(self)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = str(path)
        return path


def _is_expert_stack(canonical: str) -> bool:
    return ".feed_forward.experts." in canonical


# ---------------------------------------------------------------------------------------------- collection


class _Collector:
    """Hooks on the model's matmuls that add Σx² and row counts to float64 accumulators keyed by GGUF name."""

    def __init__(self, model, process_output: bool = False):
        from ..model.layers import Linear
        from ..model.moe import Experts, Router

        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []
        self._patched = []
        for name, module in model.named_modules():
            in_block = name.startswith("model.layers.")
            if isinstance(module, Experts) and in_block:
                self._watch_experts(name, module)
            elif isinstance(module, (Linear, Router)) and (in_block or (process_output and name == "lm_head")):
                try:
                    key = names.to_gguf(name + ".weight")
                except KeyError:  # not a checkpoint weight (e.g. an adapter): nothing to quantize
                    continue
                self._handles.append(module.register_forward_pre_hook(self._dense_hook(key)))

    def add(self, key: str, mat: int, n_mat: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64, device=x.device)
            self.counts[key] = torch.zeros(n_mat, dtype=torch.float64, device=x.device)
        self.sums[key][mat] += x.double().square().sum(0)
        self.counts[key][mat] += x.shape[0]

    def _dense_hook(self, key: str):
        def hook(_module, inputs):
            x = inputs[0]
            if x.numel() // x.shape[-1] >= MIN_DENSE_ROWS:
                self.add(key, 0, 1, x)

        return hook

    def _watch_experts(self, prefix: str, experts) -> None:
        """Collect inside the per-expert step (no extra compute). Should Experts.forward stop calling
        ``run_expert`` (a fused kernel), a forward hook notices and recomputes from the routing instead."""
        from ..model.moe import expert_linear

        gate, up, down = (names.to_gguf(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
        n = experts.num_experts
        pending = [0]  # routed rows of the current forward not yet seen by run_expert

        def run_expert(e: int, x: torch.Tensor) -> torch.Tensor:
            self.add(gate, e, n, x)
            self.add(up, e, n, x)
            h = F.silu(expert_linear(x, experts.gate_proj, e)) * expert_linear(x, experts.up_proj, e)
            self.add(down, e, n, h)
            pending[0] -= x.shape[0]
            return expert_linear(h, experts.down_proj, e)

        def before(_module, args, kwargs):
            ids = kwargs["expert_ids"] if "expert_ids" in kwargs else args[1]
            pending[0] = ids.numel()

        def after(_module, args, kwargs, _output):
            if pending[0] <= 0:
                return
            x, ids, scores = _bind_experts_args(args, kwargs)
            token = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])
            flat_ids = ids.reshape(-1)
            scaled = x[token] * scores.reshape(-1, 1).to(x.dtype)
            for e in torch.unique(flat_ids).tolist():
                xe = scaled[flat_ids == e]
                self.add(gate, e, n, xe)
                self.add(up, e, n, xe)
                self.add(down, e, n, F.silu(expert_linear(xe, experts.gate_proj, e)) * expert_linear(xe, experts.up_proj, e))
            pending[0] = 0

        experts.run_expert = run_expert  # an instance attribute shadows the method until close()
        self._patched.append(experts)
        self._handles.append(experts.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(experts.register_forward_hook(after, with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for experts in self._patched:
            del experts.run_expert
        self._handles, self._patched = [], []

    def entries(self) -> dict[str, Entry]:
        return {k: Entry(self.sums[k].cpu().numpy(), self.counts[k].cpu().numpy()) for k in sorted(self.sums)}


def _bind_experts_args(args, kwargs):
    """(x, expert_ids, scores) of an ``Experts.forward(x, expert_ids, scores)`` call."""
    values = list(args) + [kwargs[k] for k in ("x", "expert_ids", "scores") if k in kwargs]
    return values[0], values[1], values[2]


def collect_imatrix(llm, token_chunks: list[list[int]], progress: bool = True, dataset: str | None = None,
                    process_output: bool = False) -> Imatrix:
    """Run `llm` over `token_chunks` (lists of ids; see ``herd.eval.text_chunks``) and accumulate the
    statistics. The bar shows llama-imatrix's running perplexity (second half of each chunk scored)."""
    from tqdm import tqdm

    from ..eval.perplexity import first_scored, token_nll
    from . import kernels

    collector = _Collector(llm.model, process_output=process_output)
    nll, scored = 0.0, 0
    bar = tqdm(token_chunks, desc="imatrix", unit="chunk", disable=not progress)
    try:
        for chunk in bar:
            ids = torch.tensor([chunk], dtype=torch.long, device=llm.device)
            with torch.inference_mode(), kernels.exact():  # the activations of the exact weights
                logits = llm.model(ids)[0]
                first = first_scored(len(chunk))
                logp = torch.log_softmax(logits[first:-1].float(), dim=-1)
                nll += float(token_nll(logp, ids[0, first + 1:]).sum())
            scored += len(chunk) - 1 - first
            if scored:
                bar.set_postfix(ppl=f"{math.exp(nll / scored):.3f}")
    finally:
        collector.close()
    sizes = {len(c) for c in token_chunks}
    return Imatrix(collector.entries(), [dataset] if dataset else [], len(token_chunks), max(sizes, default=0))


# ---------------------------------------------------------------------------------------------- writing

_GGUF_U32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_GGUF_ALIGN = 32
_GGML_F32 = 0


def _gguf_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_bytes(im: Imatrix) -> bytes:
    """GGUF v3 with the KVs and tensors llama-imatrix writes, tensors in sorted name order."""
    kvs = [
        _gguf_str("general.type") + struct.pack("<I", _GGUF_STRING) + _gguf_str("imatrix"),
        _gguf_str("imatrix.datasets") + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(im.datasets))
        + b"".join(_gguf_str(d) for d in im.datasets),
        _gguf_str("imatrix.chunk_count") + struct.pack("<II", _GGUF_U32, int(im.chunk_count)),
        _gguf_str("imatrix.chunk_size") + struct.pack("<II", _GGUF_U32, int(im.chunk_size)),
    ]
    blobs: list[tuple[str, tuple[int, ...], bytes]] = []  # (name, ggml dims ne0 first, data)
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat, ne0 = e.sum2.shape
        blobs.append((name + ".in_sum2", (ne0, n_mat), np.ascontiguousarray(e.sum2, dtype="<f4").tobytes()))
        blobs.append((name + ".counts", (1, n_mat), np.ascontiguousarray(e.counts, dtype="<f4").tobytes()))
    infos, offset = [], 0
    for name, dims, data in blobs:
        infos.append(_gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", _GGML_F32, offset))
        offset += _aligned(len(data))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(blobs), len(kvs)) + b"".join(kvs) + b"".join(infos)
    out = bytearray(head.ljust(_aligned(len(head)), b"\0"))
    for _, _, data in blobs:
        out += data.ljust(_aligned(len(data)), b"\0")
    return bytes(out)


def _aligned(n: int) -> int:
    return (n + _GGUF_ALIGN - 1) // _GGUF_ALIGN * _GGUF_ALIGN


def _legacy_bytes(im: Imatrix) -> bytes:
    chunk_size = max(int(im.chunk_size), 1)
    stored = sorted(n for n, e in im.entries.items() if e.counts.max(initial=0) > 0)  # no rows: left out
    out = [struct.pack("<i", len(stored))]
    for name in stored:
        e = im.entries[name]
        ncall = math.ceil(float(e.counts.max()) / chunk_size)
        values = (e.means() * ncall).astype("<f4").reshape(-1)
        raw = name.encode("utf-8")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    out += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    return b"".join(out)


# ---------------------------------------------------------------------------------------------- reading


def read_imatrix(path: str | Path, num_experts: int | None = None) -> Imatrix:
    """Read an imatrix file, GGUF or legacy ``.dat`` (told apart by the magic). A legacy file stores each expert
    stack as one flat vector; it is split into `num_experts` rows, or, when that is not given, into as many
    as the file's own attention widths imply."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path, num_experts)
    if not im.entries:
        raise FormatError(f"{path}: the imatrix file holds no entries")
    im.path = str(path)
    return im


def _read_gguf(path: Path) -> Imatrix:
    from ..weights.gguf import GGUFFile

    try:
        f = GGUFFile(path)
    except (ValueError, struct.error, OSError) as exc:  # a damaged file: one line naming it
        raise FormatError(f"{path}: not a readable GGUF imatrix ({exc})") from None
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in f.fields:
            raise FormatError(f"{path}: missing imatrix metadata ({key}); not an imatrix file?")
    entries = {}
    for tname, t in f.tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        counts = f.tensors.get(base + ".counts")
        if counts is None:
            raise FormatError(f"{path}: tensor {base}: .in_sum2 without .counts")
        if t.type_id != _GGML_F32 or counts.type_id != _GGML_F32:
            raise FormatError(f"{path}: tensor {base}: .in_sum2 and .counts must be F32")
        cnt = np.frombuffer(counts.data, dtype="<f4").astype(np.float64).reshape(-1)
        flat = np.frombuffer(t.data, dtype="<f4").astype(np.float64)
        if cnt.size == 0 or flat.size % cnt.size:
            raise FormatError(f"{path}: tensor {base}: {flat.size} sums do not split into {cnt.size} matrices")
        entries[base] = Entry(flat.reshape(cnt.size, -1), cnt)
    datasets = f.fields["imatrix.datasets"]
    datasets = [datasets] if isinstance(datasets, str) else [str(d) for d in datasets]
    return Imatrix(entries, datasets, int(f.fields["imatrix.chunk_count"]), int(f.fields["imatrix.chunk_size"]))


def _read_legacy(path: Path, num_experts: int | None) -> Imatrix:
    """Values are mean·ncall; they come back as sum2 = mean·ncall with counts = ncall (the same means)."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise FormatError(f"{path}: truncated imatrix file at byte {pos}")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise FormatError(f"{path}: not an imatrix file (entry count {n})")
    flat: dict[str, tuple[np.ndarray, int]] = {}
    for _ in range(n):
        (length,) = take("<i")
        if length <= 0 or pos + length > len(raw):
            raise FormatError(f"{path}: bad entry name length {length} at byte {pos - 4}")
        name = raw[pos:pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(raw):
            raise FormatError(f"{path}: entry {name}: bad value count {nval}")
        flat[name] = (np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64), ncall)
        pos += 4 * nval
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):  # the trailer is optional
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0:
                datasets = [raw[pos:pos + length].decode("utf-8", "replace")]
    experts = num_experts or _infer_num_experts(flat)
    entries = {}
    for name, (values, ncall) in flat.items():
        canonical = names.from_gguf(name)
        n_mat = 1
        if canonical is not None and _is_expert_stack(canonical):
            if not experts or values.size % experts:
                raise FormatError(f"{path}: entry {name}: {values.size} values do not split into experts "
                                  f"({experts or 'expert count unknown'})")
            n_mat = experts
        # ncall ≤ 0 means the values are already means (llama-quantize then uses them as they are)
        entries[name] = Entry(values.reshape(n_mat, -1), np.full(n_mat, float(max(ncall, 1))))
    return Imatrix(entries, datasets, int(chunk_count), 0)


def _infer_num_experts(flat: dict[str, tuple[np.ndarray, int]]) -> int | None:
    """Experts = (values of a gate/up expert stack) / hidden width, the width read off the attention or router
    inputs (they all see the hidden state)."""
    hidden = next((v.size for n, (v, _) in flat.items()
                   if n.endswith((".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".ffn_gate_inp.weight"))), None)
    stack = next((v.size for n, (v, _) in flat.items() if n.endswith((".ffn_gate_exps.weight", ".ffn_up_exps.weight"))),
                 None)
    if hidden and stack and stack % hidden == 0:
        return stack // hidden
    return None


__all__ = ["Imatrix", "Entry", "collect_imatrix", "read_imatrix", "MIN_DENSE_ROWS"]

"""Read llama4 GGUF files (llama.cpp's format) into a herd model, keeping quantized tensors quantized.

Parsing. The header is parsed by a small bounds-checked reader over a memory map of each file (the layout
is gguf-py's ``GGUFReader``'s; its constants and block sizes come from the ``gguf`` package). We do not
call ``GGUFReader`` itself: it builds one numpy view per vocabulary string and takes over a minute on a
202k-token / 440k-merge Llama 4 header (ours: ~1 s), and it fails with assorted exceptions (ValueError,
struct.error, IndexError, numpy errors) on bad input. Every defect in a file is reported as a one-line
``FormatError`` (or ``ConfigError``) naming the file: truncation, bad magic or version, unknown value or
tensor type ids, tensor data past the end of the file, misaligned offsets, metadata of the wrong type.

Metadata -> ``herd.Config``. GGUF does not carry what llama.cpp hard-codes for llama4; those take
llama.cpp's values: attention chunk 8192 (none if ``llama4.attention.sliding_window`` is 0), NoPE every
4th layer (only the last layer when sliding_window is 0), temperature tuning on with floor 8192 and scale
0.1, QK-norm off exactly when there are 128 experts. herd writes its own keys so that models with other
values round-trip through herd (llama.cpp ignores them); when present they win:

    herd.attention_chunk_size    u32        0 = no chunked attention
    herd.no_rope_layers          u32[L]     1 = the layer uses RoPE, 0 = NoPE (transformers' convention)
    herd.layer_types             str[L]     "chunked_attention" | "full_attention"
    herd.moe_layers              u32[]      indices of the MoE layers
    herd.use_qk_norm             bool
    herd.attn_temperature_tuning bool
    herd.floor_scale             f64
    herd.attn_scale              f64

``rope_freqs.weight`` becomes ``Config.rope_freq_factors``; ``expert_feed_forward_length`` is the expert
(and shared-expert) width, ``feed_forward_length`` the dense-FFN width. A file without ``output.weight``
ties the output to the embedding, as llama.cpp does.

Tensors. F32/F16/BF16 tensors are read into torch tensors (``readinto``, not through the map, so their
pages do not linger in the process's resident set); quantized ones stay as ``QTensor`` views of the map
(no copy). ``dtype=None`` means "as stored": bfloat16 (float16) when every matrix is BF16 (F16), else
float32 (F32 files and any file with quantized matrices, whose activations run in float32).

Split files (``name-00001-of-00003.gguf``, as gguf-split writes them) are read as one model given any part;
metadata come from the first part, and ``split.no`` / ``split.count`` / ``split.tensors.count`` are checked.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError, FormatError, HerdError
from . import names

ARCH = "llama4"
GGUF_MAGIC = b"GGUF"
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml ids kept as torch tensors
_FLOAT_SIZE = {0: 4, 1: 2, 30: 2}
# value type id -> (struct format, size); 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_MAX_COUNT = 1 << 32
LAZY_STRINGS = 4096  # string arrays longer than this are decoded on first use


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF given any one of them (or [path] for a single file)."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    if not 1 <= int(m["i"]) <= n:
        raise FormatError(f"{path}: part number {int(m['i'])} of {n} in the file name")
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in parts:
        if not p.is_file():
            raise FormatError(f"{p}: part {p.name} of the split GGUF {path.name} is missing")
    return parts


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(
                f"{self.path}: truncated header (needed {n} bytes at offset {self.pos}, the file has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int):
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar(10)
        raw = self.take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: the string at offset {self.pos - n} is not UTF-8") from None

    def _strings(self, count: int) -> list[str]:
        """A string array in one tight loop (vocabularies have hundreds of thousands of entries)."""
        mv, pos, end, out = self.buf, self.pos, len(self.buf), []
        if count * 8 > end - pos:
            raise FormatError(f"{self.path}: truncated header (a string array of {count} entries at offset {pos})")
        try:
            for _ in range(count):
                n = int.from_bytes(mv[pos : pos + 8], "little")
                pos += 8
                if pos + n > end:
                    raise IndexError
                out.append(str(mv[pos : pos + n], "utf-8"))
                pos += n
        except (IndexError, UnicodeDecodeError):
            raise FormatError(f"{self.path}: truncated or invalid string array at offset {pos}") from None
        self.pos = pos
        return out

    def _skip_strings(self, count: int) -> None:
        mv, pos, end = self.buf, self.pos, len(self.buf)
        if count * 8 > end - pos:
            raise FormatError(f"{self.path}: truncated header (a string array of {count} entries at offset {pos})")
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + int.from_bytes(mv[pos : pos + 8], "little")
        if pos > end:
            raise FormatError(f"{self.path}: truncated or invalid string array at offset {self.pos}")
        self.pos = pos

    def value(self, type_id: int, key: str):
        if type_id in _SCALARS:
            v = self.scalar(type_id)
            return bool(v) if type_id == 7 else v
        if type_id == 8:
            return self.string()
        if type_id == 9:
            item_type, count = self.scalar(4), self.scalar(10)
            if count > _MAX_COUNT:
                raise FormatError(f"{self.path}: metadata {key} claims {count} array entries")
            if item_type in _NUMPY:  # numeric arrays: one vectorised read
                width = np.dtype(_NUMPY[item_type]).itemsize
                arr = np.frombuffer(self.take(count * width), dtype=_NUMPY[item_type])
                return arr.astype(bool).tolist() if item_type == 7 else arr.tolist()
            if item_type == 8:
                if count > LAZY_STRINGS:  # checked now (lengths, bounds), decoded when used
                    start = self.pos
                    self._skip_strings(count)
                    return LazyStrings(self, start, count)
                return self._strings(count)
            raise FormatError(f"{self.path}: metadata {key} is an array of unsupported item type {item_type}")
        raise FormatError(f"{self.path}: metadata {key} has unknown value type {type_id} (at offset {self.pos - 4})")


class LazyStrings(Sequence):
    """A long string array of the header (a vocabulary), decoded on first use: opening a file or loading a
    model does not turn 640k vocabulary entries into Python strings (~80 MB) unless the tokenizer is built."""

    def __init__(self, cursor: "_Cursor", pos: int, count: int):
        self._cursor, self._pos, self._count, self._items = cursor, pos, count, None

    def materialize(self) -> list[str]:
        if self._items is None:
            saved = self._cursor.pos
            self._cursor.pos = self._pos
            try:
                self._items = self._cursor._strings(self._count)
            finally:
                self._cursor.pos = saved
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        return self.materialize()[i]

    def __iter__(self):
        return iter(self.materialize())

    def __eq__(self, other) -> bool:
        return list(self.materialize()) == list(other) if isinstance(other, (list, tuple, Sequence)) else NotImplemented

    def __repr__(self) -> str:
        return f"[{self._count} strings]"


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] (ne0) is the row length
    type_id: int
    offset: int  # absolute, in its part file
    nbytes: int
    data: np.ndarray  # uint8 view into the memory map (nothing is read until used)
    part: Path

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """Metadata and tensors of one (possibly split) GGUF model, parsed from memory-mapped files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        self.parts = split_parts(self.path)
        self.fields: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self.versions: list[int] = []
        self._maps: list[np.memmap] = []
        self._types: list[dict[str, int]] = []
        for i, part in enumerate(self.parts):
            fields, tensors = self._parse(part)
            if i == 0:
                self.fields = fields
            self._check_split(part, i, fields)
            for t in tensors:
                if t.name in self.tensors:
                    raise FormatError(f"{part}: tensor {t.name} appears twice")
                self.tensors[t.name] = t
        self.field_types: dict[str, int] = self._types[0]  # key -> GGUF value type id (first part)
        total = self.fields.get("split.tensors.count")
        if len(self.parts) > 1 and total is not None and total != len(self.tensors):
            raise FormatError(f"{self.path}: split.tensors.count = {total} but the parts hold {len(self.tensors)} tensors")

    def _check_split(self, part: Path, i: int, fields: dict) -> None:
        n = len(self.parts)
        count, no = fields.get("split.count", 1 if n == 1 else None), fields.get("split.no", 0 if n == 1 else None)
        if n == 1 and isinstance(count, int) and count > 1:
            raise FormatError(f"{part}: part of a {count}-file split GGUF, but the name is not <name>-0000i-of-0000n.gguf")
        if n > 1 and (count != n or no != i):
            raise FormatError(f"{part}: split.no = {no}, split.count = {count}; expected part {i} of {n} (from the file name)")

    def _parse(self, part: Path) -> tuple[dict, list[GGUFTensor]]:
        from ..quant import formats

        try:
            mm = np.memmap(part, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise FormatError(f"{part}: cannot map the file ({_one_line(exc)})") from None
        self._maps.append(mm)
        cur = _Cursor(memoryview(mm), part)
        if len(mm) < 4 or bytes(mm[:4]) != GGUF_MAGIC:
            raise FormatError(f"{part}: not a valid GGUF file (bad magic {bytes(mm[:4])!r}; expected b'GGUF')")
        cur.take(4)
        version = cur.scalar(4)
        if version not in (2, 3):
            raise FormatError(f"{part}: not a valid GGUF file (version {version}; expected 2 or 3)")
        self.versions.append(version)
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise FormatError(f"{part}: not a valid GGUF file (implausible counts: {n_tensors} tensors, {n_kv} keys)")
        fields: dict[str, Any] = {}
        types: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in fields:
                raise FormatError(f"{part}: metadata key {key} appears twice")
            vtype = cur.scalar(4)
            fields[key] = cur.value(vtype, key)
            types[key] = vtype
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(4)
            if not 1 <= n_dims <= 4:
                raise FormatError(f"{part}: tensor {name} has {n_dims} dimensions (expected 1 to 4)")
            dims = tuple(cur.scalar(10) for _ in range(n_dims))
            type_id, offset = cur.scalar(4), cur.scalar(10)
            infos.append((name, dims, type_id, offset))
        alignment = fields.get("general.alignment", 32)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{part}: general.alignment = {alignment!r}, expected a power of two")
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors = []
        for name, dims, type_id, offset in infos:
            n = math.prod(dims)
            if type_id in FLOAT_TYPES:
                nbytes = n * _FLOAT_SIZE[type_id]
            else:
                try:
                    f = formats.format_of(type_id)
                except HerdError:
                    raise FormatError(f"{part}: tensor {name} has unknown tensor type {type_id}") from None
                if dims[0] % f.block_size:
                    raise FormatError(f"{part}: tensor {name} is {f.name} with rows of {dims[0]} (blocks of {f.block_size})")
                nbytes = n // f.block_size * f.type_size
            if offset % alignment:
                raise FormatError(f"{part}: tensor {name} data offset {offset} is not a multiple of the alignment {alignment}")
            start = data_start + offset
            if start + nbytes > len(mm):
                raise FormatError(
                    f"{part}: tensor {name} data ends at byte {start + nbytes}, past the end of the file ({len(mm)} bytes)"
                )
            tensors.append(GGUFTensor(name, dims, type_id, start, nbytes, mm[start : start + nbytes], part))
        self._types.append(types)
        return fields, tensors

    # ---------------------------------------------------------------- metadata
    def value(self, key: str, default: Any = None, kind: type | tuple = ()) -> Any:
        """Metadata value, checked against `kind` (int, float, str, bool, list); `default` when absent."""
        value = self.fields.get(key)
        if value is None:
            return default
        if isinstance(value, LazyStrings):
            value = value.materialize()  # invalid UTF-8 inside shows up here, as a FormatError
        kinds = kind if isinstance(kind, tuple) else (kind,) if kind else ()
        if kinds:
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if isinstance(value, int) and not isinstance(value, bool) and float in kinds:
                ok = True
            if not ok:
                raise FormatError(f"{self.path}: metadata {key} = {str(value)[:60]!r}, expected {_kind_name(kinds)}")
        return value

    def require(self, key: str, kind) -> Any:
        value = self.value(key, None, kind)
        if value is None:
            raise FormatError(f"{self.path}: missing metadata {key}")
        return value

    def _int_list(self, key: str, length: int | None, allowed=None) -> tuple[int, ...] | None:
        v = self.value(key, None, list)
        if v is None:
            return None
        if any(isinstance(x, bool) or not isinstance(x, int) for x in v) or (length is not None and len(v) != length):
            want = f"{length} integers" if length is not None else "integers"
            raise FormatError(f"{self.path}: metadata {key} = {str(v)[:60]}, expected {want}")
        if allowed is not None and any(x not in allowed for x in v):
            raise FormatError(f"{self.path}: metadata {key} = {str(v)[:60]}, expected entries in {allowed}")
        return tuple(int(x) for x in v)

    def config(self) -> Config:
        arch = self.value("general.architecture", None, str)
        if arch != ARCH:
            raise ConfigError(f"{self.path}: general.architecture = {arch!r}, expected 'llama4' (a Llama 4 text model)")
        k = lambda name: f"{ARCH}.{name}"  # noqa: E731
        bad = lambda key, v, want: FormatError(f"{self.path}: metadata {key} = {v!r}, expected {want}")  # noqa: E731
        layers = self.require(k("block_count"), int)
        hidden = self.require(k("embedding_length"), int)
        heads = self.require(k("attention.head_count"), int)
        kv = self.value(k("attention.head_count_kv"), heads, int)
        for key, v in ((k("block_count"), layers), (k("embedding_length"), hidden), (k("attention.head_count"), heads),
                       (k("attention.head_count_kv"), kv)):
            if not 1 <= v <= 1 << 20:
                raise bad(key, v, "a positive integer")
        if heads % kv:
            raise bad(k("attention.head_count_kv"), kv, f"a divisor of the head count ({heads})")
        head_dim = self.value(k("attention.key_length"), hidden // heads, int)
        if not 1 <= head_dim <= 1 << 16 or head_dim % 2:
            raise bad(k("attention.key_length"), head_dim, "a positive even integer")
        experts = self.value(k("expert_count"), 0, int)
        top_k = self.value(k("expert_used_count"), 1, int)
        step = self.require(k("interleave_moe_layer_step"), int)
        if not 1 <= step <= layers:
            raise bad(k("interleave_moe_layer_step"), step, f"in [1, {layers}]")
        if not 0 <= experts <= 1 << 16:
            raise bad(k("expert_count"), experts, "a non-negative integer")
        if experts and not 1 <= top_k <= experts:
            raise bad(k("expert_used_count"), top_k, f"in [1, {experts}]")
        vocab = self.value(k("vocab_size"), None, int)
        if vocab is None:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            emb = self.tensors.get("token_embd.weight")
            vocab = len(tokens) if isinstance(tokens, (list, LazyStrings)) else emb.shape[-1] if emb is not None else None
            if vocab is None:
                raise FormatError(f"{self.path}: missing metadata {k('vocab_size')}")
        if not 1 <= vocab <= 1 << 26:
            raise bad(k("vocab_size"), vocab, "a positive integer")
        swa = self.value(k("attention.sliding_window"), None, int)
        chunk = self.value("herd.attention_chunk_size", None, int)
        if chunk is None:
            chunk = 0 if swa == 0 else 8192
        interval = layers if swa == 0 else 4  # llama.cpp: "no chunking" also means only the last layer is NoPE
        no_rope = self._int_list("herd.no_rope_layers", layers, (0, 1))
        if no_rope is None:
            no_rope = tuple(int((i + 1) % interval != 0) for i in range(layers))
        layer_types = self.value("herd.layer_types", None, list)
        if layer_types is None:
            layer_types = tuple("chunked_attention" if r and swa != 0 else "full_attention" for r in no_rope)
        elif len(layer_types) != layers or any(t not in ("chunked_attention", "full_attention") for t in layer_types):
            raise bad("herd.layer_types", str(layer_types)[:60], f"{layers} entries of chunked_attention/full_attention")
        moe = self._int_list("herd.moe_layers", None)
        if moe is None:
            moe = tuple(range(step - 1, layers, step))
        if any(not 0 <= i < layers for i in moe):
            raise bad("herd.moe_layers", list(moe)[:8], f"layer indices in [0, {layers})")
        if moe and experts == 0:
            raise bad(k("expert_count"), experts, "at least 1 (the model has MoE layers)")
        factors = None
        if names.GGUF_ROPE_FREQS in self.tensors:
            freqs = self.tensors[names.GGUF_ROPE_FREQS]
            if freqs.type_id != 0 or freqs.shape != (head_dim // 2,):
                raise FormatError(f"{self.path}: rope_freqs.weight must be F32 of shape {{{head_dim // 2}}}")
            factors = tuple(float(v) for v in np.frombuffer(freqs.data.tobytes(), dtype="<f4"))
        eps = float(self.require(k("attention.layer_norm_rms_epsilon"), float))
        theta = float(self.value(k("rope.freq_base"), 10000.0, float))
        floor_scale = float(self.value("herd.floor_scale", 8192.0, float))
        attn_scale = float(self.value("herd.attn_scale", 0.1, float))
        for key, v in ((k("attention.layer_norm_rms_epsilon"), eps), (k("rope.freq_base"), theta),
                       ("herd.floor_scale", floor_scale)):
            if not (math.isfinite(v) and v > 0):
                raise bad(key, v, "a positive number")
        ctx = self.value(k("context_length"), 131072, int)
        eos = self.value("tokenizer.ggml.eos_token_id", None, int)
        bos = self.value("tokenizer.ggml.bos_token_id", None, int)
        pad = self.value("tokenizer.ggml.padding_token_id", None, int)
        return Config(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=self.value(k("expert_feed_forward_length"), self.value(k("feed_forward_length"), 0, int), int),
            intermediate_size_mlp=self.value(k("feed_forward_length"), 0, int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            moe_layers=tuple(sorted(moe)),
            no_rope_layers=no_rope,
            layer_types=tuple(layer_types),
            attention_chunk_size=chunk or None,
            use_qk_norm=self.value("herd.use_qk_norm", experts != 128, bool),
            attn_temperature_tuning=self.value("herd.attn_temperature_tuning", True, bool),
            floor_scale=floor_scale,
            attn_scale=attn_scale,
            rope_theta=theta,
            rope_scaling=None,
            rope_freq_factors=factors,
            rms_norm_eps=eps,
            max_position_embeddings=ctx,
            tie_word_embeddings="output.weight" not in self.tensors,
            interleave_moe_layer_step=step,
            bos_token_id=bos,
            eos_token_id=(eos,) if eos is not None else (),
            pad_token_id=pad,
            name=self.value("general.name", "", str),
        )

    # ---------------------------------------------------------------- tokenizer
    def tokenizer_json(self) -> dict:
        """A ``tokenizers`` tokenizer.json equivalent to the GGUF's gpt2-style (byte-level BPE) vocabulary:
        Llama 4's split regex, byte-level mapping, merges; control / user-defined tokens as added tokens."""
        from ..tokenizer.tokenizer import O200K_PATTERN

        model = self.value("tokenizer.ggml.model", None, str)
        if model != "gpt2":
            raise FormatError(f"{self.path}: tokenizer.ggml.model = {model!r}, expected 'gpt2' (byte-level BPE)")
        pre = self.value("tokenizer.ggml.pre", "llama4", str)
        if pre != "llama4":
            raise FormatError(f"{self.path}: tokenizer.ggml.pre = {pre!r}, expected 'llama4'")
        tokens = self.require("tokenizer.ggml.tokens", list)
        merges = self.value("tokenizer.ggml.merges", [], list)
        types = self.value("tokenizer.ggml.token_type", [1] * len(tokens), list)
        if len(types) != len(tokens):
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) and " " in m for m in merges):
            raise FormatError(f"{self.path}: tokenizer.ggml.tokens / merges must be strings ('left right' merges)")
        vocab, added = {}, []
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ in (3, 4):  # control / user-defined: added tokens, matched whole
                added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": typ == 3})
            elif typ != 5 or tok not in vocab:  # unused [PAD] slots do not shadow real tokens
                vocab.setdefault(tok, i)
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": True,  # a pre-token that is a whole vocabulary entry is one token (as tiktoken)
                "vocab": vocab,
                "merges": [m.split(" ", 1) for m in merges],
            },
        }

    def tokenizer(self):
        """herd Tokenizer over the GGUF vocabulary (ids equal Meta's tiktoken tokenizer's for Llama 4)."""
        from ..tokenizer import Tokenizer

        raw = self.tokenizer_json()
        tokens = self.value("tokenizer.ggml.tokens", [], list)
        bos = self.value("tokenizer.ggml.bos_token_id", None, int)
        bos_name = tokens[bos] if bos is not None and 0 <= bos < len(tokens) else "<|begin_of_text|>"
        build = getattr(Tokenizer, "_from_hf_dict", None)
        if build is not None:
            tok = build(raw, str(self.path), bos_name)
        else:  # the public constructor, through a temporary tokenizer.json
            import json
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "tokenizer.json"
                p.write_text(json.dumps(raw), encoding="utf-8")
                tok = Tokenizer.from_hf_json(p)
        tok.vocab_size = len(tokens)
        return tok

    def chat_template(self) -> str | None:
        return self.value("tokenizer.chat_template", None, str)

    # ---------------------------------------------------------------- tensors
    def stored_dtype(self) -> torch.dtype:
        """bfloat16 / float16 when every matrix is stored so, else float32 (see the module docstring)."""
        kinds = set()
        for t in self.tensors.values():
            canonical = names.from_gguf(t.name)
            if len(t.shape) > 1 and canonical and names.group_of(canonical) != "router":  # the router stays F32
                kinds.add(t.type_id)
        if kinds == {30}:
            return torch.bfloat16
        if kinds == {1}:
            return torch.float16
        return torch.float32

    def read_float(self, t: GGUFTensor) -> torch.Tensor:
        """An F32/F16/BF16 tensor read from disk into a fresh torch tensor of canonical shape."""
        out = torch.empty(t.canonical_shape, dtype=FLOAT_TYPES[t.type_id])
        if t.nbytes:
            with open(t.part, "rb") as f:
                f.seek(t.offset)
                if f.readinto(out.view(-1).view(torch.uint8).numpy()) != t.nbytes:
                    raise FormatError(f"{t.part}: tensor {t.name}: short read")
        return out

    def map_float(self, t: GGUFTensor) -> torch.Tensor:
        """An F32/F16/BF16 tensor as a copy-on-write view of the file (no read now, no copy unless written):
        pages come in as the model uses them and can be dropped again (kernels.release_pages); a write makes
        a private copy of that page and never reaches the file."""
        maps = self.__dict__.setdefault("_cow_maps", {})
        if t.part not in maps:
            maps[t.part] = np.memmap(t.part, dtype=np.uint8, mode="c")
        raw = maps[t.part][t.offset : t.offset + t.nbytes]
        if raw.size != t.nbytes:
            raise FormatError(f"{t.part}: tensor {t.name}: short read")
        return torch.from_numpy(raw).view(FLOAT_TYPES[t.type_id]).reshape(t.canonical_shape)

    def canonical_tensors(self, dtype: torch.dtype | None = None, device="cpu"):
        """(canonical name, torch tensor or QTensor) for every model tensor, in file order."""
        from ..quant.qtensor import QTensor

        for gguf_name, t in self.tensors.items():
            name = names.from_gguf(gguf_name)
            if name is None:
                continue  # rope_freqs (read into the config) and anything unknown to llama4
            if t.type_id in FLOAT_TYPES:
                mappable = t.nbytes and t.offset % FLOAT_TYPES[t.type_id].itemsize == 0
                tensor = self.map_float(t) if mappable else self.read_float(t)
                yield name, tensor.to(dtype) if dtype is not None else tensor  # a cast copies; same dtype: the view
            else:
                q = QTensor(t.data, t.type_id, t.canonical_shape)
                yield name, q.to(device) if torch.device(device).type != "cpu" else q


def _kind_name(kinds: tuple) -> str:
    words = {int: "an integer", float: "a number", str: "a string", list: "an array", bool: "a boolean"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def _wrap(path, fn, *args):
    """Run a parsing step; anything but a HerdError that bad input can provoke becomes a one-line FormatError."""
    try:
        return fn(*args)
    except HerdError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError, struct.error,
            RuntimeError, UnicodeError, AttributeError, MemoryError) as exc:
        raise FormatError(f"{path}: invalid GGUF ({type(exc).__name__}: {_one_line(exc)})") from None


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A llama4 GGUF file (or the first part of a split one) -> herd.LLM. Quantized weights stay quantized
    (views of the memory map); dtype None = as stored (see the module docstring)."""
    from ..llm import LLM
    from .loader import ModelAssembler

    f = _wrap(path, GGUFFile, path)
    config = _wrap(path, f.config)
    dtype = dtype or f.stored_dtype()

    def assemble():
        asm = ModelAssembler(config, str(f.path), dtype, device)
        for name, value in f.canonical_tensors(dtype, device):
            asm.put(name, value)
        return asm.finish()

    model = _wrap(path, assemble)
    llm = LLM(model, source=str(path), chat_template=_wrap(path, f.chat_template))
    if "tokenizer.ggml.tokens" in f.fields:
        llm._tokenizer_factory = f.tokenizer  # built on first use (a few seconds for 200k tokens)
    llm.gguf = f  # keeps the memory maps alive as long as the model
    return llm


def describe_gguf(path: str | Path) -> str:
    """`herd info FILE.gguf`: metadata (long arrays as lengths), tensor counts, bytes and bits per weight."""
    from ..quant import formats

    f = _wrap(path, GGUFFile, path)
    size = sum(p.stat().st_size for p in f.parts)
    lines = [f"file      {f.path}", f"parts     {len(f.parts)}", f"size      {size:,} bytes ({size / 2**20:.1f} MiB)",
             f"version   GGUF v{f.versions[0]}"]
    try:
        c = f.config()
        lines.append(f"model     llama4: {c.num_hidden_layers} layers ({len(c.moe_layers)} MoE), hidden {c.hidden_size}, "
                     f"{c.num_local_experts} experts top-{c.num_experts_per_tok}, vocab {c.vocab_size}, "
                     f"chunk {c.attention_chunk_size}")
    except HerdError as exc:
        lines.append(f"model     not loadable: {exc}")
    lines += ["", f"metadata ({len(f.fields)} keys):"]
    for key, value in f.fields.items():
        if isinstance(value, (list, LazyStrings)) and len(value) > 8:
            value = f"[{len(value)} items]"
        elif isinstance(value, str) and (len(value) > 80 or "\n" in value):
            value = repr(value[:77]) + f"... ({len(value)} chars)"
        lines.append(f"  {key:<44} {value}")
    by_type: dict[str, list[int]] = {}
    by_group: dict[str, list[int]] = {}
    for name, t in f.tensors.items():
        type_name = formats.format_of(t.type_id).name
        entry = by_type.setdefault(type_name, [0, 0, 0])
        entry[0] += 1
        entry[1] += t.nbytes
        entry[2] += t.n_elements
        canonical = names.from_gguf(name)
        group = names.group_of(canonical) if canonical else ("rope" if name == names.GGUF_ROPE_FREQS else "other")
        g = by_group.setdefault(group, [0, 0, 0])
        g[0] += 1
        g[1] += t.nbytes
        g[2] += t.n_elements
    lines += ["", f"tensors: {len(f.tensors)}", f"  {'type':<10} {'count':>6} {'bytes':>16} {'bpw':>7}"]
    for type_name, (count, nbytes, n) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {type_name:<10} {count:>6} {nbytes:>16,} {8 * nbytes / max(n, 1):>7.3f}")
    lines += ["", f"  {'group':<14} {'tensors':>7} {'params':>15} {'bytes':>16} {'bpw':>7}"]
    for group, (count, nbytes, n) in sorted(by_group.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {group:<14} {count:>7} {n:>15,} {nbytes:>16,} {8 * nbytes / max(n, 1):>7.3f}")
    total_b = sum(v[1] for v in by_type.values())
    total_n = sum(v[2] for v in by_type.values())
    lines.append(f"total: {total_n:,} parameters, {total_b:,} bytes of tensor data, "
                 f"{8 * total_b / max(total_n, 1):.3f} bits per weight")
    return "\n".join(lines)


def write_gguf(*args, **kwargs):
    """See ``herd.weights.gguf_write.write_gguf`` (re-exported here)."""
    from .gguf_write import write_gguf as _write

    return _write(*args, **kwargs)


__all__ = ["GGUFFile", "GGUFTensor", "LazyStrings", "load_gguf", "describe_gguf", "write_gguf", "split_parts"]

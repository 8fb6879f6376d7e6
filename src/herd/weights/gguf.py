"""Read llama4 GGUF files (llama.cpp's format) into a herd model, keeping quantized tensors quantized.

Built on the ``gguf`` package's memory-mapped reader. What llama.cpp hard-codes for llama4 and GGUF does
not carry gets llama.cpp's values (chunk 8192, NoPE every 4th layer, temperature floor 8192 / scale 0.1,
QK-norm off iff 128 experts), unless herd's own keys say otherwise. herd writes those keys so that models
with other constants round-trip through herd (llama.cpp ignores them):

    herd.attention_chunk_size (u32, 0 = no chunking)   herd.no_rope_layers (u32 array, 1 = RoPE)
    herd.use_qk_norm (bool)   herd.attn_temperature_tuning (bool)   herd.floor_scale (f32)
    herd.attn_scale (f32)     herd.moe_layers (u32 array)           herd.max_position_embeddings (u64)

Split files (``name-00001-of-00003.gguf``) are read as one model given the first part.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError, FormatError, HerdError
from . import names

ARCH = "llama4"
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml ids kept as torch tensors


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF given any one of them (or [path] for a single file)."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in parts:
        if not p.is_file():
            raise FormatError(f"{p}: part {p.name} of the split GGUF {path.name} is missing")
    return parts


GGUF_MAGIC = b"GGUF"
# value type id -> (struct format, size); 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: truncated header (needed {n} bytes at offset {self.pos}, file has {len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int):
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar(10)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a string at offset {self.pos - n} is not UTF-8") from None

    def _strings(self, count: int) -> list[str]:
        """A string array in one tight loop (vocabularies have hundreds of thousands of entries)."""
        mv, pos, end, out = self.buf, self.pos, len(self.buf), []
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

    def value(self, type_id: int, depth: int = 0):
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == 8:
            return self.string()
        if type_id == 9 and depth == 0:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type in _NUMPY:  # numeric arrays: one vectorised read
                width = np.dtype(_NUMPY[item_type]).itemsize
                raw = self.take(count * width)
                return np.frombuffer(raw, dtype=_NUMPY[item_type]).tolist()
            if item_type == 8:
                return self._strings(count)
            raise FormatError(f"{self.path}: unsupported array item type {item_type}")
        raise FormatError(f"{self.path}: unknown metadata value type {type_id} at offset {self.pos}")


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_id: int
    offset: int  # absolute, in its part file
    nbytes: int
    data: np.ndarray  # uint8 view into the memory map


class GGUFFile:
    """Metadata and tensors of one (possibly split) GGUF model, parsed from memory-mapped files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        self.parts = split_parts(self.path)
        self.fields: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._maps = []
        for i, part in enumerate(self.parts):
            fields, tensors = self._parse(part)
            if i == 0:
                self.fields = fields
            for t in tensors:
                if t.name in self.tensors:
                    raise FormatError(f"{part}: tensor {t.name} appears twice")
                self.tensors[t.name] = t

    def _parse(self, part: Path) -> tuple[dict, list[GGUFTensor]]:
        from ..quant import formats

        try:
            mm = np.memmap(part, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise FormatError(f"{part}: cannot map the file ({_one_line(exc)})") from None
        self._maps.append(mm)
        cur = _Cursor(memoryview(mm), part)
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise FormatError(f"{part}: not a valid GGUF file (bad magic; expected 'GGUF')")
        version = cur.scalar(4)
        if version not in (2, 3):
            raise FormatError(f"{part}: not a valid GGUF file (version {version}; expected 2 or 3)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise FormatError(f"{part}: not a valid GGUF file (implausible counts: {n_tensors} tensors, {n_kv} keys)")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(cur.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(4)
            if n_dims > 4:
                raise FormatError(f"{part}: tensor {name} has {n_dims} dimensions (at most 4)")
            dims = tuple(cur.scalar(10) for _ in range(n_dims))
            type_id, offset = cur.scalar(4), cur.scalar(10)
            infos.append((name, dims, type_id, offset))
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{part}: general.alignment = {alignment!r}, expected a power of two")
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors = []
        for name, dims, type_id, offset in infos:
            if type_id in FLOAT_TYPES:
                nbytes = int(np.prod(dims)) * (4 if type_id == 0 else 2)
            else:
                try:
                    nbytes = formats.bytes_for(type_id, int(np.prod(dims)))
                except HerdError as exc:
                    raise FormatError(f"{part}: tensor {name}: {exc}") from None
            start = data_start + offset
            if start + nbytes > len(mm):
                raise FormatError(
                    f"{part}: tensor {name} data ends at byte {start + nbytes}, past the end of the file ({len(mm)})"
                )
            tensors.append(GGUFTensor(name, dims, type_id, start, nbytes, mm[start : start + nbytes]))
        return fields, tensors

    # ---------------------------------------------------------------- metadata
    def value(self, key: str, default: Any = None, kind: type | tuple = ()) -> Any:
        value = self.fields.get(key)
        if value is None:
            return default
        if kind and not isinstance(value, kind):
            raise FormatError(f"{self.path}: metadata {key} = {str(value)[:60]!r}, expected {_kind_name(kind)}")
        if isinstance(value, bool) and kind and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise FormatError(f"{self.path}: metadata {key} is a bool, expected {_kind_name(kind)}")
        return value

    def require(self, key: str, kind) -> Any:
        value = self.value(key, None, kind)
        if value is None:
            raise FormatError(f"{self.path}: missing metadata {key}")
        return value

    def config(self) -> Config:
        arch = self.value("general.architecture", None, str)
        if arch != ARCH:
            raise ConfigError(f"{self.path}: general.architecture = {arch!r}, expected 'llama4'")
        k = lambda name: f"{ARCH}.{name}"  # noqa: E731
        layers = self.require(k("block_count"), int)
        hidden = self.require(k("embedding_length"), int)
        heads = self.value(k("attention.head_count"), None, int) or self.require(k("attention.head_count"), int)
        kv = self.value(k("attention.head_count_kv"), heads, int)
        head_dim = self.value(k("attention.key_length"), hidden // heads, int)
        experts = self.value(k("expert_count"), 0, int)
        step = self.require(k("interleave_moe_layer_step"), int)
        if step < 1 or layers < 1 or hidden < 1 or heads < 1 or kv < 1:
            raise FormatError(f"{self.path}: llama4 hyper-parameters must be positive")
        vocab = self.value(k("vocab_size"), None, int)
        if vocab is None:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else self.tensors["token_embd.weight"].shape[-1]
        swa = self.value(k("attention.sliding_window"), None, int)
        chunk = self.value("herd.attention_chunk_size", None, int)
        if chunk is None:
            chunk = 0 if swa == 0 else 8192
        interval = layers if swa == 0 else 4  # llama.cpp: "no chunking" also means no NoPE layers but the last step
        no_rope = self.value("herd.no_rope_layers", None, list)
        no_rope = tuple(int(v) for v in no_rope) if no_rope else tuple(int((i + 1) % interval != 0) for i in range(layers))
        moe = self.value("herd.moe_layers", None, list)
        moe = tuple(int(v) for v in moe) if moe is not None else tuple(range(step - 1, layers, step))
        factors = None
        if names.GGUF_ROPE_FREQS in self.tensors:
            freqs = self.tensors[names.GGUF_ROPE_FREQS]
            if freqs.type_id != 0:
                raise FormatError(f"{self.path}: rope_freqs.weight must be F32")
            factors = tuple(float(v) for v in np.asarray(freqs.data).view(np.float32))
        eos = self.value("tokenizer.ggml.eos_token_id", None, int)
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
            num_experts_per_tok=self.value(k("expert_used_count"), 1, int),
            moe_layers=moe,
            no_rope_layers=no_rope,
            layer_types=tuple("chunked_attention" if r else "full_attention" for r in no_rope),
            attention_chunk_size=chunk or None,
            use_qk_norm=self.value("herd.use_qk_norm", experts != 128, bool),
            attn_temperature_tuning=self.value("herd.attn_temperature_tuning", True, bool),
            floor_scale=float(self.value("herd.floor_scale", 8192.0, (int, float))),
            attn_scale=float(self.value("herd.attn_scale", 0.1, (int, float))),
            rope_theta=float(self.value(k("rope.freq_base"), 10000.0, (int, float))),
            rope_scaling=None,
            rope_freq_factors=factors,
            rms_norm_eps=float(self.require(k("attention.layer_norm_rms_epsilon"), (int, float))),
            max_position_embeddings=self.value("herd.max_position_embeddings", self.require(k("context_length"), int), int),
            interleave_moe_layer_step=step,
            bos_token_id=self.value("tokenizer.ggml.bos_token_id", None, int),
            eos_token_id=(eos,) if eos is not None else (),
            pad_token_id=self.value("tokenizer.ggml.padding_token_id", None, int),
            name=self.value("general.name", "", str),
        )

    # ---------------------------------------------------------------- tokenizer
    def tokenizer_json(self) -> dict:
        """A tokenizers-library tokenizer.json equivalent to the GGUF's gpt2-style BPE vocabulary."""
        from ..tokenizer.tokenizer import O200K_PATTERN

        model = self.value("tokenizer.ggml.model", None, str)
        if model != "gpt2":
            raise FormatError(f"{self.path}: tokenizer.ggml.model = {model!r}, expected 'gpt2' (byte-level BPE)")
        tokens = self.require("tokenizer.ggml.tokens", list)
        merges = self.require("tokenizer.ggml.merges", list)
        types = self.value("tokenizer.ggml.token_type", [1] * len(tokens), list)
        if len(types) != len(tokens):
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        vocab, added = {}, []
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ in (3, 4):  # control / user-defined: added tokens, matched whole
                added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": typ == 3})
            else:
                vocab[tok] = i
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
        from ..tokenizer import Tokenizer

        raw = self.tokenizer_json()
        bos = self.value("tokenizer.ggml.bos_token_id", None, int)
        tokens = self.require("tokenizer.ggml.tokens", list)
        bos_name = tokens[bos] if bos is not None and 0 <= bos < len(tokens) else "<|begin_of_text|>"
        tok = Tokenizer._from_hf_dict(raw, str(self.path), bos_name)
        tok.vocab_size = len(tokens)
        return tok

    def chat_template(self) -> str | None:
        return self.value("tokenizer.chat_template", None, str)

    # ---------------------------------------------------------------- tensors
    def canonical_tensors(self, dtype: torch.dtype | None):
        """(canonical name, torch tensor or QTensor) for every model tensor."""
        from ..quant import formats
        from ..quant.qtensor import QTensor

        for gguf_name, t in self.tensors.items():
            name = names.from_gguf(gguf_name)
            if name is None:
                continue  # rope_freqs (read into the config) and anything unknown
            shape = tuple(int(d) for d in reversed(t.shape))
            type_id = t.type_id
            if type_id in FLOAT_TYPES:
                raw = torch.from_numpy(np.array(t.data))  # one tensor copied out of the map at a time
                tensor = raw.view(FLOAT_TYPES[type_id])
                yield name, tensor.reshape(shape).to(dtype or torch.float32)
            else:
                try:
                    formats.format_of(type_id)
                except HerdError:
                    raise FormatError(f"{self.path}: tensor {gguf_name} has unsupported type id {type_id}") from None
                yield name, QTensor(t.data, type_id, shape)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "an array", bool: "a boolean"}.get(k, k.__name__) for k in kinds)


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A GGUF file -> herd.LLM; quantized weights stay quantized (memory-mapped)."""
    from ..llm import LLM
    from .loader import ModelAssembler

    f = GGUFFile(path)
    config = f.config()
    asm = ModelAssembler(config, str(f.path), dtype or torch.float32, device)
    for name, value in f.canonical_tensors(dtype):
        asm.put(name, value)
    model = asm.finish()
    llm = LLM(model, source=str(path), chat_template=f.chat_template())
    if "tokenizer.ggml.tokens" in f.fields:
        llm._tokenizer_factory = f.tokenizer  # built on first use (a few seconds for 200k tokens)
    llm.gguf = f  # keeps the memory maps alive as long as the model
    return llm


def describe_gguf(path: str | Path) -> str:
    from ..quant import formats

    f = GGUFFile(path)
    lines = [f"file               {f.path} ({len(f.parts)} part{'s' if len(f.parts) > 1 else ''}, "
             f"{sum(p.stat().st_size for p in f.parts):,} bytes)", "", "metadata:"]
    for key, value in f.fields.items():
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} items]"
        elif isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        lines.append(f"  {key:<44} {value}")
    by_type: dict[str, list[int]] = {}
    by_group: dict[str, list[int]] = {}
    for name, t in f.tensors.items():
        type_name = formats.format_of(t.type_id).name
        entry = by_type.setdefault(type_name, [0, 0, 0])
        entry[0] += 1
        entry[1] += t.nbytes
        entry[2] += int(np.prod(t.shape))
        canonical = names.from_gguf(name)
        group = names.group_of(canonical) if canonical else "other"
        g = by_group.setdefault(group, [0, 0])
        g[0] += t.nbytes
        g[1] += int(np.prod(t.shape))
    lines += ["", f"tensors: {len(f.tensors)}", "  type        count          bytes    bpw"]
    for type_name, (count, nbytes, n) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {type_name:<10} {count:>6} {nbytes:>14,} {8 * nbytes / max(n, 1):>6.3f}")
    lines.append("  group              params          bytes    bpw")
    for group, (nbytes, n) in sorted(by_group.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {group:<14} {n:>10,} {nbytes:>14,} {8 * nbytes / max(n, 1):>6.3f}")
    total_b = sum(v[1] for v in by_type.values())
    total_n = sum(v[2] for v in by_type.values())
    lines.append(f"total: {total_n:,} parameters, {total_b:,} bytes, {8 * total_b / max(total_n, 1):.3f} bits per weight")
    return "\n".join(lines)

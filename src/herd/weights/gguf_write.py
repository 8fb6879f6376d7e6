"""Write llama4 GGUF files the way llama.cpp's converter does: same keys (and key order), tensor names,
layouts and type rules, streamed tensor by tensor and renamed into place only when complete.

The serializer is herd's own (a GGUF v3 file is a header, key/values, tensor infos and aligned data): every
tensor's place is known from the config before any data is written, so tensors are fetched, converted and
written one at a time, in any order, and the model is never in memory twice. It also packs the 640k-string
vocabulary in well under a second, where gguf-py's ``GGUFWriter`` takes ~15 s.

Public entry points: ``write_gguf`` (any source of canonical tensors, a per-tensor type plan; reused by
``herd quantize``), ``convert_hf`` (``herd convert``), ``resolve_vocab`` and ``GGUFVocab``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..errors import FormatError, HerdError, TokenizerError
from ..model.layers import llama3_freq_factors
from . import names

ARCH = "llama4"
GGUF_VERSION = 3
ALIGNMENT = 32
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
FLOAT_TYPES = (F32, F16, BF16)
OUTTYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
# ggml type -> general.file_type (llama.cpp's LlamaFileType) of a file whose weights are mostly that type
FILE_TYPES = {F32: 0, F16: 1, 2: 2, 3: 3, Q8_0: 7, 6: 8, 7: 9, 10: 10, 11: 12, 12: 15, 13: 17, 14: 18, 16: 19,
              17: 20, 18: 23, 19: 24, 20: 25, 21: 26, 22: 28, 23: 30, 29: 31, BF16: 32, 34: 36, 35: 37}
# GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Rows converted per slab while writing (bounds the temporary float copy of a big tensor).
SLAB_ELEMENTS = 1 << 22
# Values per quantizer call: the K-quant encoders are fastest on small batches (~16k-32k values).
QUANT_SLAB_ELEMENTS = 1 << 15

# herd's own keys: the Llama 4 constants llama.cpp hard-codes (documented in herd.weights.gguf).
HERD_KEYS = ("herd.attention_chunk_size", "herd.no_rope_layers", "herd.layer_types", "herd.moe_layers",
             "herd.use_qk_norm", "herd.attn_temperature_tuning", "herd.floor_scale", "herd.attn_scale")


# ---------------------------------------------------------------------------------------------- values

# GGUF value type ids
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
_SCALAR_FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
               T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}
_NP = {T_U8: "<u1", T_I8: "<i1", T_U16: "<u2", T_I16: "<i2", T_U32: "<u4", T_I32: "<i4", T_F32: "<f4",
       T_BOOL: "<u1", T_U64: "<u8", T_I64: "<i8", T_F64: "<f8"}


_U64 = struct.Struct("<Q")


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(vtype: int, value: Any, item_type: int | None = None) -> bytes:
    head = struct.pack("<I", vtype)
    if vtype == T_STR:
        return head + _pack_str(value)
    if vtype == T_ARR:
        values = list(value)
        head += struct.pack("<IQ", item_type, len(values))
        if item_type == T_STR:
            pack_len = _U64.pack
            return head + b"".join([pack_len(len(b)) + b for b in (v.encode("utf-8") for v in values)])
        return head + np.asarray(values, dtype=_NP[item_type]).tobytes()
    return head + struct.pack(_SCALAR_FMT[vtype], value)


class KV:
    """Ordered GGUF key/values, packed as they are added."""

    def __init__(self):
        self.items: dict[str, bytes] = {}

    def add(self, key: str, vtype: int, value: Any, item_type: int | None = None) -> None:
        self.items[key] = _pack_str(key) + _pack_value(vtype, value, item_type)

    def u32(self, key, v):
        self.add(key, T_U32, int(v))

    def f32(self, key, v):
        self.add(key, T_F32, float(v))

    def string(self, key, v):
        self.add(key, T_STR, str(v))

    def boolean(self, key, v):
        self.add(key, T_BOOL, bool(v))

    def array(self, key, item_type, values):
        self.add(key, T_ARR, values, item_type)

    def blob(self) -> bytes:
        return b"".join(self.items.values())


# ---------------------------------------------------------------------------------------------- vocab


@dataclass
class GGUFVocab:
    """What GGUF's ``tokenizer.ggml.*`` keys hold for a byte-level BPE (``gpt2``) vocabulary."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_sep: bool = False
    pre: str = "llama4"

    def padded(self, size: int) -> "GGUFVocab":
        """The vocabulary padded to the model's vocab_size with ``[PAD{i}]`` unused tokens (as the converter)."""
        n = len(self.tokens)
        if n > size:
            raise TokenizerError(f"the tokenizer has {n} tokens but the model's vocab_size is {size}")
        if n == size:
            return self
        extra = range(n, size)
        return GGUFVocab(self.tokens + [f"[PAD{i}]" for i in extra], self.types + [UNUSED] * len(extra), self.merges,
                         self.bos, self.eos, self.pad, self.add_bos, self.add_eos, self.add_sep, self.pre)

    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    from ..tokenizer.tokenizer import byte_to_unicode

    return str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})


def byte_level(b: bytes) -> str:
    """GPT-2 byte-level string of raw token bytes (each byte -> one printable character)."""
    return b.decode("latin-1").translate(_byte_table())


@lru_cache(maxsize=2)
def _tiktoken_vocab(path: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    from ..tokenizer.tokenizer import NUM_SPECIAL, llama4_special_token_names

    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not a tiktoken BPE file ({type(exc).__name__})") from None
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise TokenizerError(f"{path}: BPE ranks are not 0..{len(by_rank) - 1}")
    # A merge (left, right) exists where left, right and left+right are all tokens; it applies with the
    # priority of the merged token's rank, ties broken by the parts' ranks (as transformers' TikTokenConverter).
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    get = ranks.get
    for token, rank in by_rank:
        for i in range(1, len(token)):
            lr = get(token[:i])
            if lr is not None:
                rr = get(token[i:])
                if rr is not None:
                    merges.append((rank, lr, rr, token[:i], token[i:]))
    merges.sort()
    merge_strs = tuple(f"{byte_level(a)} {byte_level(b)}" for _, _, _, a, b in merges)
    tokens = tuple(byte_level(b) for b, _ in by_rank) + tuple(llama4_special_token_names()[:NUM_SPECIAL])
    types = (NORMAL,) * len(by_rank) + (CONTROL,) * NUM_SPECIAL
    return tokens, types, merge_strs


def vocab_from_tiktoken(path: str | Path) -> GGUFVocab:
    """Meta's tiktoken file (base64 token + rank lines) + Llama 4's 2,048 special tokens; merges from ranks."""
    tokens, types, merges = _tiktoken_vocab(str(path))
    return _with_default_ids(GGUFVocab(list(tokens), list(types), list(merges)))


def vocab_from_tokenizer_json(path: str | Path) -> GGUFVocab:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        model = raw["model"]
        vocab: dict[str, int] = model["vocab"]
        added = {int(t["id"]): t for t in raw.get("added_tokens") or []}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({type(exc).__name__})") from None
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: only byte-level BPE tokenizers can be written to GGUF (model type {model.get('type')!r})")
    size = max(list(vocab.values()) + list(added)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, NORMAL
    for i, t in added.items():
        content = str(t["content"])
        tokens[i] = content
        looks_control = content.startswith("<|") and content.endswith("|>")
        types[i] = CONTROL if t.get("special") or looks_control else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    post = raw.get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    v = GGUFVocab(tokens, types, merges)
    if single:
        v.add_bos = "SpecialToken" in single[0]
        v.add_eos = len(single) > 1 and "SpecialToken" in single[-1]
    return _with_default_ids(v)


def vocab_from_gguf(f) -> GGUFVocab:
    """The tokenizer keys of an opened GGUF file (``herd.weights.gguf.GGUFFile``), to copy into another."""
    g = f.fields.get
    tokens = f.require("tokenizer.ggml.tokens", list)
    merges = f.value("tokenizer.ggml.merges", [], list)
    types = f.value("tokenizer.ggml.token_type", [NORMAL] * len(tokens), list)
    return GGUFVocab(list(tokens), [int(t) for t in types], list(merges), g("tokenizer.ggml.bos_token_id"),
                     g("tokenizer.ggml.eos_token_id"), g("tokenizer.ggml.padding_token_id"),
                     bool(g("tokenizer.ggml.add_bos_token", True)), bool(g("tokenizer.ggml.add_eos_token", False)),
                     bool(g("tokenizer.ggml.add_sep_token", False)), str(g("tokenizer.ggml.pre", "llama4")))


def _with_default_ids(v: GGUFVocab) -> GGUFVocab:
    index = v.index()
    v.bos = index.get("<|begin_of_text|>")
    v.eos = index.get("<|end_of_text|>")
    v.pad = index.get("<|finetune_right_pad|>")
    return v


def _default_tiktoken_path() -> Path:
    from importlib import resources

    try:
        ref = resources.files("llama_models.llama4") / "tokenizer.model"
    except ModuleNotFoundError:
        raise TokenizerError("the default Llama 4 tokenizer needs the 'llama-models' package") from None
    with resources.as_file(ref) as p:
        return Path(p)


def checkpoint_vocab(directory: str | Path | None) -> GGUFVocab:
    """A checkpoint's tokenizer as GGUF vocabulary: tokenizer.json, else tokenizer.model, else Meta's default."""
    d = Path(directory) if directory is not None else None
    if d is not None and (d / "tokenizer.json").is_file():
        v = vocab_from_tokenizer_json(d / "tokenizer.json")
    elif d is not None and (d / "tokenizer.model").is_file():
        v = vocab_from_tiktoken(d / "tokenizer.model")
    else:
        v = vocab_from_tiktoken(_default_tiktoken_path())
    return v


def resolve_vocab(tokenizer: Any) -> GGUFVocab:
    """GGUFVocab from: None (Meta's tokenizer), a GGUFVocab, a (tokens, types, merges) triple, a checkpoint
    directory, a tokenizer.json / tiktoken file, a .gguf file or an opened GGUFFile, or a herd Tokenizer."""
    if tokenizer is None:
        return checkpoint_vocab(None)
    if isinstance(tokenizer, GGUFVocab):
        return tokenizer
    if isinstance(tokenizer, tuple) and len(tokenizer) == 3:
        return _with_default_ids(GGUFVocab(list(tokenizer[0]), list(tokenizer[1]), list(tokenizer[2])))
    if hasattr(tokenizer, "fields") and hasattr(tokenizer, "require"):
        return vocab_from_gguf(tokenizer)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "source"):  # a herd Tokenizer: its file
        tokenizer = tokenizer.source
    p = Path(tokenizer)
    if p.is_dir():
        from ..llm import _read_chat_template

        return _checkpoint_special_ids(p, checkpoint_vocab(p), _read_chat_template(p))
    if p.suffix == ".gguf":
        from .gguf import GGUFFile

        return vocab_from_gguf(GGUFFile(p))
    if p.suffix == ".json":
        return vocab_from_tokenizer_json(p)
    if p.is_file():
        return vocab_from_tiktoken(p)
    raise TokenizerError(f"{tokenizer}: no tokenizer there (expected a directory, tokenizer.json, tiktoken file or .gguf)")


def _checkpoint_special_ids(directory: Path, v: GGUFVocab, chat_template: str | None) -> GGUFVocab:
    """bos/eos/pad as llama.cpp's SpecialVocab finds them: tokenizer_config.json names, else config.json ids."""
    index = v.index()
    found: dict[str, int] = {}
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        try:
            raw = json.loads(tc.read_text(encoding="utf-8"))
            for typ in ("bos", "eos", "pad"):
                tok = raw.get(f"{typ}_token")
                tok = tok.get("content") if isinstance(tok, dict) else tok
                if isinstance(tok, str) and tok in index:
                    found[typ] = index[tok]
        except (ValueError, AttributeError, OSError):
            pass
    cj = directory / "config.json"
    if cj.is_file():
        try:
            raw = json.loads(cj.read_text(encoding="utf-8"))
            raw = raw.get("text_config", raw) if raw.get("model_type") == "llama4" else raw
            for typ in ("bos", "eos", "pad"):
                tid = raw.get(f"{typ}_token_id")
                if typ not in found and isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(v.tokens):
                    found[typ] = tid
        except (ValueError, AttributeError, OSError):
            pass
    if "eos" not in found and chat_template and "<|eot|>" in index:
        found["eos"] = index["<|eot|>"]  # an instruct model: turns end with <|eot|>
    for typ, tid in found.items():
        setattr(v, typ, tid)
    return v


# ---------------------------------------------------------------------------------------------- types


def default_type(name: str, shape: tuple[int, ...], outtype: int) -> int:
    """The converter's rules: 1-D tensors, norms and the router stay F32; the rest take `outtype`
    (F16 where a quantized type's block does not divide the row length)."""
    if len(shape) == 1 or name.endswith("norm.weight") or names.group_of(name) == "router":
        return F32
    if outtype not in FLOAT_TYPES:
        from ..quant import formats

        if shape[-1] % formats.format_of(outtype).block_size:
            return F16
    return outtype


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize never quantizes 1-D tensors, norms or the router (ffn_gate_inp)."""
    return default_type(name, shape, Q8_0) != F32


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    n = math.prod(shape)
    if qtype == F32:
        return 4 * n
    if qtype in (F16, BF16):
        return 2 * n
    from ..quant import formats

    return formats.bytes_for(qtype, n)


def _qtype_id(q: Any) -> int:
    from ..quant import formats

    return int(formats.format_of(q).qtype)


# ---------------------------------------------------------------------------------------------- tensors


def tensor_plan(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical name, shape) in file order: embedding, layers, output norm, output (output only if untied)."""
    entries = [(n, s) for n, s, _ in names.expected_tensors(config)]
    head = [e for e in entries if e[0] == "model.embed_tokens.weight"]
    tail = [e for e in entries if e[0] == "model.norm.weight"]
    if not config.tie_word_embeddings:
        tail += [e for e in entries if e[0] == "lm_head.weight"]
    skip = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return head + [e for e in entries if e[0] not in skip] + tail


def _rope_factors(config: Config) -> torch.Tensor | None:
    if config.rope_freq_factors is not None:
        return torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    if config.rope_scaling is not None:  # llama3 scaling (the only kind Config accepts)
        return llama3_freq_factors(config).float()
    return None


def _matrices(value: Any) -> tuple[int, int]:
    """(number of [out, in] matrices, rows per matrix) of a 2-D or 3-D weight."""
    shape = tuple(value.shape)
    if len(shape) == 3:
        return shape[0], shape[1]
    return 1, math.prod(shape[:-1]) if len(shape) > 1 else 1


def _encoded_chunks(name: str, value: Any, qtype: int, importance: Any = None) -> Iterator[bytes]:
    """The bytes GGUF stores for `value` (a tensor, numpy array or QTensor) as `qtype`, a slab of rows at a time."""
    from ..quant import formats
    from ..quant.qtensor import QTensor

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    shape = tuple(value.shape)
    row_len = shape[-1] if shape else 1
    if isinstance(value, QTensor) and int(value.qtype) == qtype:  # same blocks: copied as they are
        data = value.data.reshape(-1)
        step = max(1, SLAB_ELEMENTS // row_len) * value.row_bytes
        for start in range(0, data.numel(), step):
            yield data[start : start + step].cpu().numpy().tobytes()
        return
    n_mat, rows = _matrices(value)
    slab = max(1, (SLAB_ELEMENTS if qtype in FLOAT_TYPES else QUANT_SLAB_ELEMENTS) // max(row_len, 1))
    imp = None
    if importance is not None:
        imp = torch.as_tensor(importance, dtype=torch.float32)
    for m in range(n_mat):
        w_imp = imp[m] if imp is not None and imp.dim() == 2 else imp
        for start in range(0, rows, slab):
            stop = min(start + slab, rows)
            if isinstance(value, QTensor):
                first = m * rows + start
                x = value.dequantize(rows=slice(first, first + stop - start))
            else:
                x = value[m] if len(shape) == 3 else value.reshape(-1, row_len)
                x = x[start:stop]
            x = x.detach().reshape(-1, row_len).cpu()
            if qtype == F32:
                yield x.to(torch.float32).contiguous().numpy().tobytes()
            elif qtype == F16:
                yield x.to(torch.float32).to(torch.float16).contiguous().numpy().tobytes()
            elif qtype == BF16:
                yield x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
            else:
                q = formats.quantize(x.to(torch.float32).contiguous(), qtype, importance=w_imp)
                yield (q.numpy() if isinstance(q, torch.Tensor) else np.asarray(q, dtype=np.uint8)).tobytes()


# ---------------------------------------------------------------------------------------------- file layout


@dataclass
class _Info:
    gguf_name: str
    canonical: str | None
    shape: tuple[int, ...]  # canonical (numpy) order
    qtype: int
    nbytes: int
    part: int = 0
    offset: int = 0  # relative to the part's data section


def _pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _split_infos(infos: list[_Info], max_tensors: int, max_bytes: int) -> int:
    """Assign parts (as gguf-split: a new part when the next tensor would pass a limit); -> part count."""
    part, count, size = 0, 0, 0
    for info in infos:
        over_n = max_tensors and count >= max_tensors
        over_b = max_bytes and count and size + info.nbytes > max_bytes
        if over_n or over_b:
            part, count, size = part + 1, 0, 0
        info.part = part
        count += 1
        size += _pad(info.nbytes)
    return part + 1


def part_paths(path: Path, n_parts: int) -> list[Path]:
    """``model.gguf`` -> ``model-00001-of-00003.gguf`` ... (llama.cpp's split naming), or [path]."""
    if n_parts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:05d}-of-{n_parts:05d}.gguf") for i in range(1, n_parts + 1)]


def _header(kv: KV, infos: list[_Info]) -> tuple[bytes, int]:
    """Header + key/values + tensor infos, and the (aligned) start of the data section."""
    out = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(infos), len(kv.items)), kv.blob()]
    offset = 0
    for info in infos:
        info.offset = offset
        dims = tuple(reversed(info.shape)) or (1,)
        out.append(_pack_str(info.gguf_name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                   + struct.pack("<IQ", info.qtype, offset))
        offset += _pad(info.nbytes)
    blob = b"".join(out)
    return blob, _pad(len(blob))


# ---------------------------------------------------------------------------------------------- writer


def _metadata(config: Config, vocab: GGUFVocab, chat_template: str | None, name: str, file_type: int,
              size_label: str | None, herd_keys: bool = True) -> KV:
    c, a, kv = config, ARCH, KV()
    kv.string("general.architecture", a)
    kv.string("general.type", "model")
    kv.string("general.name", name)
    if size_label:
        kv.string("general.size_label", size_label)
    kv.u32(f"{a}.block_count", c.num_hidden_layers)
    kv.u32(f"{a}.context_length", min(c.max_position_embeddings, 2**32 - 1))
    kv.u32(f"{a}.embedding_length", c.hidden_size)
    kv.u32(f"{a}.feed_forward_length", c.intermediate_size_mlp)
    kv.u32(f"{a}.attention.head_count", c.num_attention_heads)
    kv.u32(f"{a}.attention.head_count_kv", c.num_key_value_heads)
    kv.f32(f"{a}.rope.freq_base", c.rope_theta)
    kv.f32(f"{a}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    kv.u32(f"{a}.expert_count", c.num_local_experts)
    kv.u32(f"{a}.expert_used_count", c.num_experts_per_tok)
    kv.u32(f"{a}.attention.key_length", c.head_dim)
    kv.u32(f"{a}.attention.value_length", c.head_dim)
    kv.u32("general.file_type", file_type)
    kv.u32(f"{a}.vocab_size", c.vocab_size)
    kv.u32(f"{a}.rope.dimension_count", c.head_dim)
    kv.u32(f"{a}.interleave_moe_layer_step", c.interleave_moe_layer_step)
    kv.u32(f"{a}.expert_feed_forward_length", c.intermediate_size)
    if all(t == "full_attention" for t in c.layer_types):
        kv.u32(f"{a}.attention.sliding_window", 0)  # MobileLLM-style: no chunked layer
    kv.u32("general.quantization_version", 2)
    kv.string("tokenizer.ggml.model", "gpt2")
    kv.string("tokenizer.ggml.pre", vocab.pre)
    kv.array("tokenizer.ggml.tokens", T_STR, vocab.tokens)
    kv.array("tokenizer.ggml.token_type", T_I32, vocab.types)
    kv.array("tokenizer.ggml.merges", T_STR, vocab.merges)
    for key, tid in (("bos", vocab.bos), ("eos", vocab.eos), ("padding", vocab.pad)):
        if tid is not None:
            kv.u32(f"tokenizer.ggml.{key}_token_id", tid)
    kv.boolean("tokenizer.ggml.add_bos_token", vocab.add_bos)
    kv.boolean("tokenizer.ggml.add_eos_token", vocab.add_eos)
    kv.boolean("tokenizer.ggml.add_sep_token", vocab.add_sep)
    if chat_template:
        kv.string("tokenizer.chat_template", chat_template)
    if not herd_keys:
        return kv
    # herd's own keys (llama.cpp ignores them): the constants it hard-codes, so any Llama 4 round-trips.
    kv.u32("herd.attention_chunk_size", c.attention_chunk_size or 0)
    kv.array("herd.no_rope_layers", T_U32, [int(v) for v in c.no_rope_layers])
    kv.array("herd.layer_types", T_STR, list(c.layer_types))
    kv.array("herd.moe_layers", T_U32, [int(v) for v in c.moe_layers])
    kv.boolean("herd.use_qk_norm", c.use_qk_norm)
    kv.boolean("herd.attn_temperature_tuning", c.attn_temperature_tuning)
    kv.add("herd.floor_scale", T_F64, float(c.floor_scale))
    kv.add("herd.attn_scale", T_F64, float(c.attn_scale))
    return kv


def _size_label(infos: list[_Info]) -> str:
    """The converter's size label ("4x53M"): shared params + one expert's params, times the expert count."""
    import gguf

    total = shared = expert = expert_sum = n_exp = 0
    for info in infos:
        size = math.prod(info.shape)
        total += size
        if "_exps." in info.gguf_name and len(info.shape) >= 3:
            e = info.shape[-3]
            expert += size // e
            expert_sum += e
            n_exp += 1
        else:
            shared += size
    return gguf.size_label(total, shared, expert, expert_sum // n_exp if n_exp else 0)


def _tensor_source(tensors: Any, plan_names: list[str]) -> Iterator[tuple[str, Any]]:
    if callable(tensors) and not isinstance(tensors, Mapping):
        for n in plan_names:
            yield n, tensors(n)
    elif isinstance(tensors, Mapping):
        for n in plan_names:
            if n in tensors:
                yield n, tensors[n]
    else:
        yield from tensors


def write_gguf(
    path: str | Path,
    config: Config,
    tensors: Callable[[str], Any] | Mapping[str, Any] | Iterable[tuple[str, Any]],
    tokenizer: Any = None,
    chat_template: str | None = None,
    qtypes: Mapping[str, Any] | Any = None,
    *,
    outtype: Any = F32,
    importance: Mapping[str, Any] | None = None,
    file_type: int | None = None,
    split_max_tensors: int = 0,
    split_max_size: int = 0,
    name: str | None = None,
    extra_kv: Callable[[KV], None] | None = None,
    herd_keys: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Write a llama4 GGUF (llama.cpp's converter layout) and return the file(s) written.

    tensors: canonical (herd) name -> tensor, as a function, a mapping or an iterable of (name, value)
      pairs in any order; values are torch tensors, numpy arrays or ``QTensor`` s (copied as they are when
      the target type is theirs). Names the config does not expect are ignored; a missing one is an error.
    tokenizer: anything ``resolve_vocab`` accepts (None = Meta's Llama 4 tokenizer).
    qtypes: the type plan: a mapping canonical name -> ggml type (QType, id or name) for the tensors it
      names, or one type for every quantizable tensor (2-D+, not norms, not the router); tensors without an
      entry follow the converter's rules for `outtype` (1-D, norms and router F32, the rest `outtype`).
    importance: canonical name -> per-column importance ([in] or [E, in]) passed to the quantizer.
    split_max_tensors / split_max_size: write ``name-0000i-of-0000n.gguf`` parts (as gguf-split).
    extra_kv: called with the key/value table after the standard keys (e.g. ``quantize.imatrix.*``).
    herd_keys: also write herd's ``herd.*`` keys (off: exactly the converter's key set).
    The output is written to ``<file>.tmp`` and renamed when every tensor is in place.
    """
    path = Path(path)
    outtype = _qtype_id(outtype)
    plan = tensor_plan(config)
    if qtypes is not None and not isinstance(qtypes, Mapping):
        one = _qtype_id(qtypes)
        qtypes = {n: one for n, s in plan if is_quantizable(n, s)}
    chosen: dict[str, int] = {}
    for n, s in plan:
        q = _qtype_id(qtypes[n]) if qtypes and n in qtypes else default_type(n, s, outtype)
        if q not in FLOAT_TYPES:
            from ..quant import formats

            f = formats.format_of(q)
            if s[-1] % f.block_size:
                raise HerdError(f"tensor {n}: rows of {s[-1]} cannot be stored as {f.name} (blocks of {f.block_size})")
        chosen[n] = q
    if file_type is None:
        by_type: dict[int, int] = {}
        for n, s in plan:
            if len(s) > 1:
                by_type[chosen[n]] = by_type.get(chosen[n], 0) + math.prod(s)
        file_type = FILE_TYPES.get(max(by_type, key=by_type.get) if by_type else outtype, 0)

    infos: list[_Info] = []
    rope = _rope_factors(config)
    if rope is not None:
        infos.append(_Info(names.GGUF_ROPE_FREQS, None, tuple(rope.shape), F32, rope.numel() * 4))
    for n, s in plan:
        infos.append(_Info(names.to_gguf(n), n, s, chosen[n], _nbytes(s, chosen[n])))
    n_parts = _split_infos(infos, split_max_tensors, split_max_size)
    if n_parts > 65535:
        raise HerdError(f"{path}: {n_parts} split parts (at most 65535)")

    vocab = resolve_vocab(tokenizer).padded(config.vocab_size)
    kv = _metadata(config, vocab, chat_template, name or path.stem, file_type, _size_label(infos), herd_keys)
    if extra_kv is not None:
        extra_kv(kv)
    finals = part_paths(path, n_parts)
    tmps = [p.with_name(p.name + ".tmp") for p in finals]
    by_canonical = {i.canonical: i for i in infos if i.canonical}
    files = []
    try:
        starts = []
        for part in range(n_parts):
            part_kv = kv if part == 0 else KV()
            if n_parts > 1:
                part_kv.add("split.no", T_U16, part)
                part_kv.add("split.count", T_U16, n_parts)
                part_kv.add("split.tensors.count", T_I32, len(infos))
            part_infos = [i for i in infos if i.part == part]
            head, start = _header(part_kv, part_infos)
            f = open(tmps[part], "wb")
            files.append(f)
            f.write(head)
            f.truncate(start + sum(_pad(i.nbytes) for i in part_infos))  # zero padding, filled as data arrives
            starts.append(start)

        def put(info: _Info, chunks: Iterable[bytes]) -> None:
            f = files[info.part]
            f.seek(starts[info.part] + info.offset)
            written = 0
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            if written != info.nbytes:
                raise HerdError(f"tensor {info.canonical or info.gguf_name}: wrote {written} bytes, expected {info.nbytes}")

        if rope is not None:
            put(infos[0], [rope.numpy().tobytes()])
        done: set[str] = set()
        bar = tqdm(total=len(plan), desc="writing", unit="tensor", disable=not progress, leave=False)
        for n, value in _tensor_source(tensors, [n for n, _ in plan]):
            info = by_canonical.get(n)
            if info is None or n in done:
                continue
            if tuple(value.shape) != info.shape:
                raise HerdError(f"tensor {n}: shape {list(value.shape)}, expected {list(info.shape)} from the config")
            put(info, _encoded_chunks(n, value, info.qtype, (importance or {}).get(n)))
            done.add(n)
            bar.update(1)
        bar.close()
        missing = [n for n, _ in plan if n not in done]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise HerdError(f"{path}: no data for tensor {missing[0]}{more}")
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
        return finals
    finally:
        for f in files:
            f.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def planned_size(config: Config, qtypes: Mapping[str, Any], tokenizer: Any = None, chat_template: str | None = None,
                 name: str = "model", file_type: int = 0, extra_kv: Callable[[KV], None] | None = None) -> int:
    """The exact size of the single-file GGUF ``write_gguf`` would write for this type plan (no data read):
    header, metadata and tensor infos, plus every tensor's aligned data."""
    infos: list[_Info] = []
    rope = _rope_factors(config)
    if rope is not None:
        infos.append(_Info(names.GGUF_ROPE_FREQS, None, tuple(rope.shape), F32, rope.numel() * 4))
    for n, s in tensor_plan(config):
        q = _qtype_id(qtypes[n]) if n in qtypes else default_type(n, s, F32)
        infos.append(_Info(names.to_gguf(n), n, s, q, _nbytes(s, q)))
    vocab = resolve_vocab(tokenizer).padded(config.vocab_size)
    kv = _metadata(config, vocab, chat_template, name, file_type, _size_label(infos))
    if extra_kv is not None:
        extra_kv(kv)
    _, start = _header(kv, infos)
    return start + sum(_pad(i.nbytes) for i in infos)


# ---------------------------------------------------------------------------------------------- HF -> GGUF


def hf_tensor_getter(directory: str | Path, config: Config) -> Callable[[str], torch.Tensor]:
    """canonical name -> tensor, read lazily from an HF safetensors checkpoint (one tensor at a time)."""
    from .safetensors import SafetensorsCheckpoint

    directory = Path(directory)
    ckpt = SafetensorsCheckpoint(directory)
    by_text_name: dict[str, str] = {}
    per_expert: dict[str, dict[int, str]] = {}
    for hf_name in ckpt.names():
        text = names.strip_hf_prefix(hf_name)
        if text is None:
            continue
        by_text_name[text] = hf_name
        for canonical, _ in names.hf_to_canonical(text, torch.empty(0, 0, 0, device="meta")):
            if canonical.endswith("]"):  # one expert of a per-expert checkpoint
                base, e = canonical[:-1].split("[")
                per_expert.setdefault(base, {})[int(e)] = hf_name

    def get(canonical: str) -> torch.Tensor:
        if canonical in per_expert:
            parts = per_expert[canonical]
            return torch.stack([names.hf_to_canonical(names.strip_hf_prefix(parts[e]), ckpt.get(parts[e]))[0][1]
                                for e in sorted(parts)])
        hits = names.lookup(canonical, "canonical")
        if not hits:
            raise HerdError(f"no HF name for tensor {canonical}")
        entry, bid = hits[0]
        text = names.render(entry, "hf", bid)
        if text not in by_text_name:
            raise HerdError(f"{directory}: missing tensor {text}")
        for n, t in names.hf_to_canonical(text, ckpt.get(by_text_name[text])):
            if n == canonical:
                return t
        raise HerdError(f"{directory}: tensor {text} does not provide {canonical}")

    return get


def convert_hf(directory: str | Path, out: str | Path, outtype: str = "f32", progress: bool = True,
               split_max_tensors: int = 0, split_max_size: int = 0) -> list[Path]:
    """``herd convert``: an HF Llama 4 checkpoint -> a llama4 GGUF as llama.cpp's convert_hf_to_gguf.py writes it."""
    from ..llm import _read_chat_template
    from .loader import check_safetensors

    directory = Path(directory)
    if outtype not in OUTTYPES:
        raise HerdError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    config = Config.from_file(directory / "config.json")
    check_safetensors(directory, config)  # fail on a bad checkpoint before writing anything
    return write_gguf(
        out,
        config,
        hf_tensor_getter(directory, config),
        directory,
        chat_template=_read_chat_template(directory),
        outtype=OUTTYPES[outtype],
        name=directory.name,
        split_max_tensors=split_max_tensors,
        split_max_size=split_max_size,
        progress=progress,
    )


__all__ = ["write_gguf", "planned_size", "convert_hf", "resolve_vocab", "GGUFVocab", "checkpoint_vocab", "tensor_plan",
           "default_type", "is_quantizable", "hf_tensor_getter", "part_paths", "KV", "OUTTYPES", "FILE_TYPES"]

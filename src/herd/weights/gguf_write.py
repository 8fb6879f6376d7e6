"""Write llama4 GGUF files as llama.cpp's converter does (same keys, names, layouts), streamed and atomic.

Tensor infos are computed from the config first, then each tensor is fetched, converted and written in
turn, so a model is never in memory twice. Output goes to a hidden temporary folder next to the target
and is renamed into place only when complete (split outputs: every part).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..errors import FormatError, HerdError
from ..model.layers import llama3_freq_factors
from . import names

F32, F16, BF16, Q8_0 = 0, 1, 30, 8
OUTTYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
# general.file_type values (llama.cpp's LlamaFileType) for the uniform output types
FILE_TYPES = {F32: 0, F16: 1, Q8_0: 7, BF16: 32, 2: 2, 3: 3, 6: 8, 7: 9, 10: 10, 11: 12, 12: 15, 13: 17, 14: 18,
              16: 19, 17: 20, 18: 23, 19: 24, 20: 25, 21: 26, 22: 28, 23: 30, 29: 31, 34: 36, 35: 37}


# ---------------------------------------------------------------------------------------------- vocab


def _byte_level(b: bytes) -> str:
    from ..tokenizer.tokenizer import byte_to_unicode

    table = byte_to_unicode()
    return "".join(table[x] for x in b)


@lru_cache(maxsize=2)
def vocab_from_tiktoken(path: Path) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types, merges from Meta's tiktoken file (merges derived from the BPE ranks)."""
    from ..tokenizer.tokenizer import NUM_SPECIAL, llama4_special_token_names

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    tokens = [_byte_level(b) for b, _ in by_rank]
    # A merge (a, b) exists where a, b and a+b are all tokens; its priority is the rank of a+b.
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in by_rank:
        if len(token) < 2:
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort(key=lambda m: (m[0], m[1], m[2]))
    merge_strs = [f"{_byte_level(a)} {_byte_level(b)}" for _, _, _, a, b in merges]
    specials = llama4_special_token_names()[:NUM_SPECIAL]
    types = [1] * len(tokens) + [3] * len(specials)
    return tokens + specials, types, merge_strs


def vocab_from_tokenizer_json(path: Path) -> tuple[list[str], list[int], list[str]]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    model = raw.get("model", {})
    if model.get("type") != "BPE":
        raise HerdError(f"{path}: only byte-level BPE tokenizers can be written to GGUF (model type {model.get('type')!r})")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    size = max(list(vocab.values()) + list(added)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, 1
    for i, t in added.items():
        content = t["content"]
        tokens[i] = content
        looks_control = content.startswith("<|") and content.endswith("|>")
        types[i] = 3 if t.get("special") or looks_control else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def checkpoint_vocab(directory: Path | None) -> tuple[list[str], list[int], list[str]]:
    if directory is not None and (directory / "tokenizer.json").is_file():
        return vocab_from_tokenizer_json(directory / "tokenizer.json")
    if directory is not None and (directory / "tokenizer.model").is_file():
        return vocab_from_tiktoken(directory / "tokenizer.model")
    from importlib import resources

    with resources.as_file(resources.files("llama_models.llama4") / "tokenizer.model") as p:
        return vocab_from_tiktoken(p)


# ---------------------------------------------------------------------------------------------- types


def default_type(name: str, shape: tuple[int, ...], outtype: int) -> int:
    """llama.cpp converter rules: 1-D tensors, norms and the router stay F32; the rest take `outtype`
    (F16 where a quantized type does not fit the row length)."""
    if len(shape) == 1 or name.endswith("norm.weight") or names.group_of(name) == "router":
        return F32
    if outtype not in (F32, F16, BF16):
        from ..quant import formats

        if shape[-1] % formats.format_of(outtype).block_size:
            return F16
    return outtype


def _encode(t: torch.Tensor, qtype: int) -> np.ndarray:
    """Tensor -> numpy array of the bytes/values GGUF stores, in canonical (numpy) order."""
    t = t.detach().to(torch.float32).contiguous()
    if qtype == F32:
        return t.numpy()
    if qtype == F16:
        return t.to(torch.float16).numpy()
    if qtype == BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    from ..quant import formats

    return formats.quantize(t, qtype).numpy()


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    n = int(np.prod(shape))
    if qtype == F32:
        return 4 * n
    if qtype in (F16, BF16):
        return 2 * n
    from ..quant import formats

    return formats.bytes_for(qtype, n)


def _info_shape(shape: tuple[int, ...], qtype: int) -> tuple[tuple[int, ...], np.dtype, int | None]:
    """(shape, numpy dtype, raw ggml type) to declare a tensor to GGUFWriter.add_tensor_info."""
    if qtype == F32:
        return shape, np.dtype(np.float32), None
    if qtype == F16:
        return shape, np.dtype(np.float16), None
    nbytes_row = _nbytes((shape[-1],), qtype)
    return (*shape[:-1], nbytes_row), np.dtype(np.uint8), qtype


# ---------------------------------------------------------------------------------------------- writer


def tensor_plan(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical name, shape) in the order llama.cpp's converter writes them (embedding, layers, output)."""
    entries = list((n, s) for n, s, _ in names.expected_tensors(config))
    head = [e for e in entries if e[0] == "model.embed_tokens.weight"]
    tail = [e for e in entries if e[0] in ("model.norm.weight", "lm_head.weight")]
    body = [e for e in entries if e not in head and e not in tail]
    return head + body + tail


def write_gguf(
    path: str | Path,
    config: Config,
    get_tensor: Callable[[str], torch.Tensor],
    vocab: tuple[list[str], list[int], list[str]],
    chat_template: str | None = None,
    qtypes: dict[str, int] | None = None,
    outtype: int = F32,
    split_max_tensors: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `config`'s tensors (fetched one by one with `get_tensor(canonical_name)`) as a llama4 GGUF.

    qtypes: per canonical name overrides of the ggml type (a quantization plan); other tensors follow the
    converter's rules for `outtype`. Returns the written file(s)."""
    import gguf

    path = Path(path)
    plan = tensor_plan(config)
    if config.tie_word_embeddings:
        plan = [p for p in plan if p[0] != "lm_head.weight"]  # llama.cpp reuses token_embd
    types = {n: (qtypes or {}).get(n, default_type(n, s, outtype)) for n, s in plan}
    tmp_dir = path.parent / f".{path.name}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        w = gguf.GGUFWriter(tmp_dir / path.name, "llama4", split_max_tensors=split_max_tensors)
        _write_metadata(w, config, vocab, chat_template, name or path.stem, FILE_TYPES.get(outtype, 0))
        rope = None
        if config.rope_scaling is not None or config.rope_freq_factors is not None:
            rope = (
                torch.tensor(config.rope_freq_factors, dtype=torch.float32)
                if config.rope_freq_factors is not None
                else llama3_freq_factors(config)
            )
            w.add_tensor_info(names.GGUF_ROPE_FREQS, rope.shape, np.dtype(np.float32), rope.numel() * 4)
        for n, shape in plan:
            info_shape, dtype, raw = _info_shape(shape, types[n])
            w.add_tensor_info(names.to_gguf(n), info_shape, dtype, _nbytes(shape, types[n]), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if rope is not None:
            w.write_tensor_data(rope.numpy())
        for n, shape in tqdm(plan, desc="writing", unit="tensor", disable=not progress):
            t = get_tensor(n)
            if tuple(t.shape) != shape:
                raise HerdError(f"tensor {n}: shape {list(t.shape)}, expected {list(shape)}")
            w.write_tensor_data(_encode(t, types[n]))
        w.close()
        written = sorted(tmp_dir.iterdir())
        finals = []
        for f in written:
            target = path.parent / f.name
            os.replace(f, target)
            finals.append(target)
        return finals
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_metadata(w, config: Config, vocab, chat_template, name: str, file_type: int) -> None:
    c, a = config, "llama4"
    w.add_type("model")
    w.add_name(name)
    w.add_uint32(f"{a}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{a}.context_length", min(c.max_position_embeddings, 2**32 - 1))
    w.add_uint32(f"{a}.embedding_length", c.hidden_size)
    w.add_uint32(f"{a}.feed_forward_length", c.intermediate_size_mlp)
    w.add_uint32(f"{a}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", c.num_key_value_heads)
    w.add_float32(f"{a}.rope.freq_base", c.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32(f"{a}.expert_count", c.num_local_experts)
    w.add_uint32(f"{a}.expert_used_count", c.num_experts_per_tok)
    w.add_uint32(f"{a}.attention.key_length", c.head_dim)
    w.add_uint32(f"{a}.attention.value_length", c.head_dim)
    w.add_uint32("general.file_type", file_type)
    w.add_uint32(f"{a}.vocab_size", c.vocab_size)
    w.add_uint32(f"{a}.rope.dimension_count", c.head_dim)
    if all(t == "full_attention" for t in c.layer_types):
        w.add_uint32(f"{a}.attention.sliding_window", 0)
    w.add_uint32(f"{a}.interleave_moe_layer_step", c.interleave_moe_layer_step)
    w.add_uint32(f"{a}.expert_feed_forward_length", c.intermediate_size)
    w.add_quantization_version(2)
    # herd's own keys: the constants llama.cpp hard-codes, so non-default models round-trip through herd
    w.add_uint32("herd.attention_chunk_size", c.attention_chunk_size or 0)
    w.add_array("herd.no_rope_layers", [int(v) for v in c.no_rope_layers])
    w.add_array("herd.moe_layers", [int(v) for v in c.moe_layers])
    w.add_bool("herd.use_qk_norm", c.use_qk_norm)
    w.add_bool("herd.attn_temperature_tuning", c.attn_temperature_tuning)
    w.add_float64("herd.floor_scale", c.floor_scale)
    w.add_float64("herd.attn_scale", c.attn_scale)
    w.add_uint64("herd.max_position_embeddings", c.max_position_embeddings)
    tokens, types, merges = vocab
    if len(tokens) != c.vocab_size:
        raise HerdError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {c.vocab_size}")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "llama4")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    index = {t: i for i, t in enumerate(tokens)}
    bos = index.get("<|begin_of_text|>", c.bos_token_id)
    eos = index.get("<|eot|>") if chat_template else index.get("<|end_of_text|>")
    if eos is None and c.eos_token_id:
        eos = c.eos_token_id[0]
    pad = index.get("<|finetune_right_pad|>", c.pad_token_id)
    if bos is not None:
        w.add_uint32("tokenizer.ggml.bos_token_id", bos)
    if eos is not None:
        w.add_uint32("tokenizer.ggml.eos_token_id", eos)
    if pad is not None:
        w.add_uint32("tokenizer.ggml.padding_token_id", pad)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)


# ---------------------------------------------------------------------------------------------- HF -> GGUF


def hf_tensor_getter(directory: Path, config: Config) -> Callable[[str], torch.Tensor]:
    """canonical name -> tensor, read lazily from an HF safetensors checkpoint."""
    from .safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(directory)
    by_text_name = {}
    for hf_name in ckpt.names():
        text = names.strip_hf_prefix(hf_name)
        if text is not None:
            by_text_name[text] = hf_name

    def get(canonical: str) -> torch.Tensor:
        hits = names.lookup(canonical, "canonical")
        if not hits:
            raise HerdError(f"no HF name for tensor {canonical}")
        entry, bid = hits[0]
        text = names.render(entry, "hf", bid)
        if text not in by_text_name:
            raise HerdError(f"{directory}: missing tensor {text}")
        for name, t in names.hf_to_canonical(text, ckpt.get(by_text_name[text])):
            if name == canonical:
                return t
        raise HerdError(f"{directory}: tensor {text} does not provide {canonical}")

    return get


def convert_hf(directory: str | Path, out: str | Path, outtype: str = "f32", progress: bool = True) -> list[Path]:
    from ..llm import _read_chat_template

    directory = Path(directory)
    if outtype not in OUTTYPES:
        raise HerdError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    config = Config.from_file(directory / "config.json")
    from .loader import check_safetensors

    check_safetensors(directory, config)  # fail on a bad checkpoint before writing anything
    return write_gguf(
        out,
        config,
        hf_tensor_getter(directory, config),
        checkpoint_vocab(directory),
        chat_template=_read_chat_template(directory),
        outtype=OUTTYPES[outtype],
        name=directory.name,
        progress=progress,
    )

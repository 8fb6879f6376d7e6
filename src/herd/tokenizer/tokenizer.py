"""Llama 4 tokenizer with two backends behind one interface.

* Meta's tiktoken BPE file (``tokenizer.model``: base64 token + rank per line), 200,000 base tokens plus
  2,048 special tokens at 200000..202047 in Meta's order, split with Llama 4's o200k-style regex.
* A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), e.g. a checkpoint's own or the small
  vocabulary of herd's demo model.

``encode`` never turns special-token *text* found in the input into special ids (a user typing
``<|eot|>`` must not end the turn): both backends encode it as ordinary text, as Meta's reference does.
Special tokens enter a prompt only by id (the chat formatter) or through ``encode_with_specials``.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import TokenizerError

# Llama 4's pre-tokenization regex (identical to OpenAI's o200k pattern; the merges are Meta's own).
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta splits long inputs before BPE (tiktoken is quadratic on long runs); ids depend on it, so we match.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

NUM_SPECIAL = 2048


def llama4_special_token_names() -> list[str]:
    """The 2,048 special-token names in id order (200000 onwards)."""
    text_post = (
        ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
        + [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
        + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
        + [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    )
    vision = (
        ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>", "<|vision_reserved_special_token_1|>"]
        + ["<|tile_x_separator|>", "<|tile_y_separator|>"]
        + [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
        + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
        + [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
    )
    reasoning = [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)] + [
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    names = basic + text_post + vision + reasoning
    return names + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL - len(names))]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def split_long_runs(text: str) -> Iterable[str]:
    """Cut `text` so no piece has more than MAX_RUN_CHARS consecutive whitespace or non-whitespace characters,
    in the same places Meta's reference cuts (its ids depend on the cut)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        run, piece_start = 0, 0
        was_space = chunk[0].isspace() if chunk else False
        for i, ch in enumerate(chunk):
            is_space = ch.isspace()
            if is_space != was_space:
                run = 0
                was_space = is_space
            run += 1
            if run > MAX_RUN_CHARS:
                yield chunk[piece_start:i]
                piece_start, run = i, 1
        yield chunk[piece_start:]


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.buffer = b""

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        self.buffer += self.tokenizer.id_to_piece(token_id)
        # Emit the longest prefix that is complete UTF-8; keep up to 3 trailing bytes of a started character.
        for cut in range(len(self.buffer), max(len(self.buffer) - 4, -1), -1):
            try:
                text = self.buffer[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buffer = self.buffer[cut:]
            if len(self.buffer) >= 4:  # not a character in progress but invalid bytes: give them up
                text += self.buffer.decode("utf-8", errors="replace")
                self.buffer = b""
            return text
        text, self.buffer = self.buffer.decode("utf-8", errors="replace"), b""
        return text

    def flush(self) -> str:
        text, self.buffer = self.buffer.decode("utf-8", errors="replace"), b""
        return text


class Tokenizer:
    """One interface over a tiktoken BPE file or a Hugging Face tokenizer.json."""

    def __init__(self, backend, special_tokens: dict[str, int], vocab_size: int, source: str, bos_name: str = "<|begin_of_text|>"):
        self._backend = backend
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.special_ids = frozenset(special_tokens.values())
        self._special_names = {i: n for n, i in special_tokens.items()}
        self.vocab_size = vocab_size
        self.bos_id = self.special_tokens.get(bos_name)
        self.eos_id = self.special_tokens.get("<|end_of_text|>")
        self.eot_id = self.special_tokens.get("<|eot|>")
        self.eom_id = self.special_tokens.get("<|eom|>")
        self.pad_id = self.special_tokens.get("<|finetune_right_pad|>")
        self.stop_ids = [i for i in (self.eos_id, self.eom_id, self.eot_id) if i is not None]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_tiktoken_file(cls, path: str | Path) -> "Tokenizer":
        import tiktoken

        path = Path(path)
        ranks: dict[bytes, int] = {}
        try:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file") from None
        except (ValueError, OSError) as exc:
            raise TokenizerError(f"{path}: line {n} is not '<base64 token> <rank>' ({type(exc).__name__})") from None
        if not ranks:
            raise TokenizerError(f"{path}: empty tokenizer file (expected base64 token + rank lines)")
        base = len(ranks)
        specials = {name: base + i for i, name in enumerate(llama4_special_token_names())}
        enc = tiktoken.Encoding(name=path.name, pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return cls(_TiktokenBackend(enc), specials, base + NUM_SPECIAL, str(path))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({type(exc).__name__})") from None
        if not isinstance(raw, dict) or "model" not in raw:
            raise TokenizerError(f"{path}: not a tokenizer.json (expected an object with a 'model')")
        bos_name = "<|begin_of_text|>"
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                bos = json.loads(config.read_text(encoding="utf-8")).get("bos_token")
                bos = bos.get("content") if isinstance(bos, dict) else bos
                if isinstance(bos, str):
                    bos_name = bos
            except (ValueError, AttributeError):
                pass
        return cls._from_hf_dict(raw, str(path), bos_name)

    @classmethod
    def _from_hf_dict(cls, raw: dict, source: str, bos_name: str = "<|begin_of_text|>") -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        added = raw.get("added_tokens") or []
        specials = {t["content"]: int(t["id"]) for t in added if t.get("special", True)}
        plain = dict(raw, added_tokens=[])  # a twin that never matches special text inside the input
        plain["post_processor"] = None
        try:
            full = HFTokenizer.from_str(json.dumps(raw))
            plain_tok = HFTokenizer.from_str(json.dumps(plain))
        except Exception as exc:
            raise TokenizerError(f"{source}: cannot build the tokenizer ({' '.join(str(exc).split())[:200]})") from None
        vocab = raw["model"].get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        size = max(ids + [t["id"] for t in added]) + 1
        return cls(_HFBackend(full, plain_tok), specials, size, source, bos_name)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            return cls.from_hf_json(directory / "tokenizer.json")
        if (directory / "tokenizer.model").is_file():
            return cls.from_tiktoken_file(directory / "tokenizer.model")
        return cls.default()

    @classmethod
    def default(cls) -> "Tokenizer":
        """Meta's Llama 4 tokenizer as shipped in the `llama-models` package (read in place, never copied)."""
        return _default_tokenizer()

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected a str, got {type(text).__name__}")
        ids = self._backend.encode_plain(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special-token strings (``<|eot|>``) stand for the special tokens."""
        return self._backend.encode_specials(text, self.special_tokens)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        data = b"".join(
            self.id_to_piece(int(i)) for i in ids if not (skip_special and int(i) in self.special_ids)
        )
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> bytes:
        name = self._special_names.get(token_id)
        if name is not None:
            return name.encode("utf-8")
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"{self.source}: token id {token_id} out of range [0, {self.vocab_size})")
        return self._backend.piece(token_id)

    def token_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise TokenizerError(f"{self.source}: unknown special token {name!r}")
        return self.special_tokens[name]

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab={self.vocab_size}, backend={type(self._backend).__name__})"


class _TiktokenBackend:
    def __init__(self, enc):
        self.enc = enc

    def encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in split_long_runs(text):
            out.extend(self.enc.encode(piece, allowed_special=set(), disallowed_special=()))
        return out

    def encode_specials(self, text: str, specials: dict[str, int]) -> list[int]:
        out: list[int] = []
        for piece in split_long_runs(text):
            out.extend(self.enc.encode(piece, allowed_special="all", disallowed_special=()))
        return out

    def piece(self, token_id: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""


class _HFBackend:
    def __init__(self, full, plain):
        self.full, self.plain = full, plain
        self._pieces: dict[int, bytes] = {}

    def encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in split_long_runs(text):
            out.extend(self.plain.encode(piece, add_special_tokens=False).ids)
        return out

    def encode_specials(self, text: str, specials: dict[str, int]) -> list[int]:
        return self.full.encode(text, add_special_tokens=False).ids

    def piece(self, token_id: int) -> bytes:
        cached = self._pieces.get(token_id)
        if cached is None:
            token = self.full.id_to_token(token_id)
            if token is None:
                return b""
            table = unicode_to_byte()
            try:
                cached = bytes(table[c] for c in token)
            except KeyError:  # not a byte-level token (e.g. an added non-special token): its text
                cached = token.encode("utf-8")
            self._pieces[token_id] = cached
        return cached


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    try:
        ref = resources.files("llama_models.llama4") / "tokenizer.model"
    except ModuleNotFoundError:
        raise TokenizerError("the default Llama 4 tokenizer needs the 'llama-models' package (pip install llama-models)") from None
    with resources.as_file(ref) as path:
        return Tokenizer.from_tiktoken_file(path)

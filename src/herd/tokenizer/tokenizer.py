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

import binascii
import codecs
import json
import re
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
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    ``push(id)`` returns the text completed so far (possibly ""); bytes of a character that is still
    incomplete wait for the next token. Byte sequences that can never be valid UTF-8 become U+FFFD, as
    ``decode`` does, so the concatenated pieces plus ``flush()`` always equal ``decode(ids)``.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        return self._utf8.decode(self.tokenizer.id_to_piece(token_id))

    def flush(self) -> str:
        """The text still held (an unfinished character comes out as U+FFFD); the decoder is then empty."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """One interface over a tiktoken BPE file or a Hugging Face tokenizer.json.

    Attributes: ``vocab_size`` (all ids, specials included), ``bos_id``, ``eos_id`` (``<|end_of_text|>``),
    ``eot_id``, ``eom_id``, ``pad_id`` (``<|finetune_right_pad|>`` or None), ``stop_ids`` and
    ``special_tokens`` (name -> id). Ids of tokens a vocabulary lacks are None.
    """

    def __init__(self, backend, special_tokens: dict[str, int], vocab_size: int, source: str, bos_name: str = "<|begin_of_text|>"):
        self._backend = backend
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.special_ids = frozenset(special_tokens.values())
        self._special_names = {i: n for n, i in special_tokens.items()}
        self._special_re: re.Pattern | None = None
        self.vocab_size = vocab_size
        self.bos_id = self.special_tokens.get(bos_name, self.special_tokens.get("<|begin_of_text|>"))
        self.eos_id = self.special_tokens.get("<|end_of_text|>")
        self.eot_id = self.special_tokens.get("<|eot|>")
        self.eom_id = self.special_tokens.get("<|eom|>")
        self.pad_id = self.special_tokens.get("<|finetune_right_pad|>")
        self.stop_ids = [i for i in (self.eos_id, self.eom_id, self.eot_id) if i is not None]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_tiktoken_file(cls, path: str | Path) -> "Tokenizer":
        """Meta's ``tokenizer.model``: one ``<base64 token> <rank>`` per line; the 2,048 specials follow the ranks."""
        import tiktoken

        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file") from None
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read the tokenizer file ({exc.strerror or type(exc).__name__})") from None
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(data.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                ranks[binascii.a2b_base64(fields[0], strict_mode=True)] = int(fields[1])
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}: line {n} is not '<base64 token> <rank>' (not a tiktoken BPE file?)") from None
        if not ranks:
            raise TokenizerError(f"{path}: empty tokenizer file (expected '<base64 token> <rank>' lines)")
        base = len(ranks)
        if sorted(ranks.values()) != list(range(base)):
            raise TokenizerError(f"{path}: ranks are not 0..{base - 1}, each once (corrupt tokenizer file?)")
        missing = sum(bytes([b]) not in ranks for b in range(256))
        if missing:  # byte-level BPE needs every byte as a token, or some text cannot be encoded
            raise TokenizerError(f"{path}: lacks single-byte tokens for {missing} of the 256 byte values (corrupt tokenizer file?)")
        specials = {name: base + i for i, name in enumerate(llama4_special_token_names())}
        try:
            enc = tiktoken.Encoding(name=path.name, pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        except Exception as exc:  # tiktoken rejects e.g. a vocabulary without all 256 single bytes
            raise TokenizerError(f"{path}: tiktoken cannot use this vocabulary ({' '.join(str(exc).split())[:200]})") from None
        return cls(_TiktokenBackend(enc), specials, base + NUM_SPECIAL, str(path))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "Tokenizer":
        """A Hugging Face ``tokenizer.json``; a ``tokenizer_config.json`` beside it adds the special tokens of its
        ``added_tokens_decoder`` that the tokenizer.json lacks and names the BOS token (``bos_token``)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({' '.join(str(exc).split())[:200]})") from None
        bos_name, extra = "<|begin_of_text|>", {}
        config_path = path.parent / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path, "tokenizer_config.json")
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
            bos = config.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            if isinstance(bos, str):
                bos_name = bos
            decoder = config.get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict):
                raise TokenizerError(f"{config_path}: added_tokens_decoder must map '<id>' to {{'content': ...}}")
            for key, tok in decoder.items():
                try:
                    tid, content, special = int(key), tok["content"], bool(tok.get("special", True))
                except (ValueError, TypeError, KeyError, AttributeError):
                    raise TokenizerError(f"{config_path}: added_tokens_decoder must map '<id>' to {{'content': ...}}") from None
                if special and isinstance(content, str):
                    extra[content] = tid
        return cls._from_hf_backend(backend, str(path), bos_name, extra)

    @classmethod
    def _from_hf_dict(cls, raw: dict, source: str, bos_name: str = "<|begin_of_text|>") -> "Tokenizer":
        """From a tokenizer.json already parsed into a dict (e.g. one built from GGUF metadata)."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_str(json.dumps(raw))
        except Exception as exc:
            raise TokenizerError(f"{source}: cannot build the tokenizer ({' '.join(str(exc).split())[:200]})") from None
        return cls._from_hf_backend(backend, source, bos_name, {})

    @classmethod
    def _from_hf_backend(cls, backend, source: str, bos_name: str, extra: dict[str, int]) -> "Tokenizer":
        added = backend.get_added_tokens_decoder()
        specials = {tok.content: tid for tid, tok in sorted(added.items()) if tok.special}
        for content, tid in extra.items():
            specials.setdefault(content, tid)
        # Special-token text in the input is encoded as ordinary text, as Meta encodes it; special tokens
        # reach a prompt by id only. (Non-special added tokens are still matched, as HF does.)
        backend.encode_special_tokens = True
        backend.no_truncation()
        backend.no_padding()
        size = max([*backend.get_vocab(with_added_tokens=True).values(), *specials.values(), -1]) + 1
        other_added = {tid: tok.content for tid, tok in added.items() if not tok.special}
        return cls(_HFBackend(backend, other_added), specials, size, source, bos_name)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        """``tokenizer.json`` if the directory has one, else ``tokenizer.model``, else Meta's default."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: not a directory (expected one holding tokenizer.json or tokenizer.model)")
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
        """Token ids of `text`; special-token text in it is encoded as ordinary text. BOS first iff `bos`."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected a str, got {type(text).__name__}")
        ids = self._backend.encode_plain(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special-token strings (``<|eot|>``) stand for the special tokens, e.g. a
        rendered chat template. Never use this on text a user wrote."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_with_specials: expected a str, got {type(text).__name__}")
        if self._special_re is None:
            names = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, names))) if names else re.compile(r"(?!)")
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self._backend.encode_plain(text[pos : m.start()])
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._backend.encode_plain(text[pos:])
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their names unless `skip_special`."""
        data = b"".join(
            self.id_to_piece(i) for i in map(int, ids) if not (skip_special and i in self.special_ids)
        )
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token: its name in UTF-8)."""
        name = self._special_names.get(token_id)
        if name is not None:
            return name.encode("utf-8")
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"{self.source}: token id {token_id} out of range [0, {self.vocab_size})")
        return self._backend.piece(token_id)

    def token_id(self, name: str) -> int:
        """The id of special token `name` (e.g. ``"<|eot|>"``)."""
        if name not in self.special_tokens:
            raise TokenizerError(f"{self.source}: unknown special token {name!r}")
        return self.special_tokens[name]

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab={self.vocab_size}, backend={type(self._backend).__name__})"


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such tokenizer file") from None
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"{path}: not a valid {what} ({type(exc).__name__})") from None


class _TiktokenBackend:
    def __init__(self, enc):
        self.enc = enc

    def encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in split_long_runs(text):
            out.extend(self.enc.encode_ordinary(piece))
        return out

    def piece(self, token_id: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""


class _HFBackend:
    def __init__(self, tok, added: dict[int, str]):
        self.tok = tok
        self.added = added  # non-special added tokens: id -> text
        self._pieces: dict[int, bytes] = {}

    def encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in split_long_runs(text):
            out.extend(self.tok.encode(piece, add_special_tokens=False).ids)
        return out

    def piece(self, token_id: int) -> bytes:
        cached = self._pieces.get(token_id)
        if cached is None:
            if token_id in self.added:  # an added token is its own text, not byte-level symbols
                return self.added[token_id].encode("utf-8")
            token = self.tok.id_to_token(token_id)
            if token is None:
                return b""
            table = unicode_to_byte()
            try:
                cached = bytes(table[c] for c in token)
            except KeyError:  # not a byte-level vocabulary: the token's own text
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

"""herd's tokenizer against Meta's reference tokenizer (llama_models), for both backends."""

from __future__ import annotations

import json

import pytest

from herd import TokenizerError
from herd.tokenizer import Tokenizer

from tok_strings import generated_strings, long_string  # noqa: E402  (seeded strings shared by the tests)


def meta_encode(meta_tokenizer, s, bos=False):
    """Meta's reference encoding of user text: special-token text stays text."""
    return meta_tokenizer.encode(s, bos=bos, eos=False, allowed_special=set(), disallowed_special=())


STRINGS = generated_strings()
WITH_SPECIAL_TEXT = [s for s in STRINGS if "<|" in s]


def test_ids_equal_meta_on_generated_strings(herd_tok, meta_tokenizer):
    assert len(STRINGS) >= 1000 and len(WITH_SPECIAL_TEXT) > 100
    mismatches, bad_roundtrip = [], []
    for s in STRINGS:
        ids = herd_tok.encode(s)
        if ids != meta_encode(meta_tokenizer, s):
            mismatches.append(s[:60])
        if herd_tok.decode(ids) != s:
            bad_roundtrip.append(s[:60])
    assert not mismatches, (len(mismatches), mismatches[:5])
    assert not bad_roundtrip, (len(bad_roundtrip), bad_roundtrip[:5])


def test_generated_strings_cover_the_hard_cases():
    joined = "".join(STRINGS[:1000])
    for ch in ("日", "한", "م", "न", "🎉", "<|eot|>", "def f(x)"):
        assert ch in joined
    assert any(" " * 25_001 in s for s in STRINGS)  # a whitespace run over Meta's cut
    assert any("x" * 25_001 in s for s in STRINGS)  # and a non-whitespace one


def test_stream_decoder_on_generated_strings(herd_tok):
    for s in STRINGS[:300]:
        ids = herd_tok.encode(s)
        dec = herd_tok.stream_decoder()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == s == herd_tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_ids_equal_meta_on_input_over_400k_chars(herd_tok, meta_tokenizer):
    s = long_string()
    assert len(s) > 400_000
    ids = herd_tok.encode(s)
    assert ids == meta_encode(meta_tokenizer, s)
    assert herd_tok.decode(ids) == s


def test_special_text_is_plain_text_and_bos_comes_once(herd_tok, meta_tokenizer):
    for s in WITH_SPECIAL_TEXT[:200]:
        ids = herd_tok.encode(s, bos=True)
        assert ids == meta_encode(meta_tokenizer, s, bos=True)
        assert ids[0] == 200000 and not set(ids[1:]) & herd_tok.special_ids
    assert herd_tok.encode("<|eot|>") == meta_encode(meta_tokenizer, "<|eot|>")
    assert len(herd_tok.encode("<|eot|>")) == 5
    assert herd_tok.encode("", bos=True) == [200000] and herd_tok.encode("") == []


def test_encode_with_specials_maps_special_text_to_ids(herd_tok, meta_tokenizer):
    for s in WITH_SPECIAL_TEXT[:200] + ["<|eot|>", "a<|header_start|>b<|header_end|>\n\n<|fake|>"]:
        assert herd_tok.encode_with_specials(s) == meta_tokenizer.encode(s, bos=False, eos=False, allowed_special="all")
    assert herd_tok.encode_with_specials("<|eot|>") == [200008]


def test_special_tokens_and_ids_equal_meta(herd_tok, meta_tokenizer):
    assert herd_tok.vocab_size == 202048
    assert herd_tok.special_tokens == meta_tokenizer.special_tokens  # 2,048 names in Meta's id order
    assert herd_tok.bos_id == meta_tokenizer.bos_id == 200000
    assert herd_tok.eos_id == meta_tokenizer.eos_id == 200001
    assert (herd_tok.eot_id, herd_tok.eom_id, herd_tok.pad_id) == (200008, 200007, 200018)
    assert herd_tok.stop_ids == sorted(meta_tokenizer.stop_tokens)
    for name in ("<|header_start|>", "<|python_start|>", "<|patch|>", "<|image|>", "<|reasoning_thinking_end|>",
                 "<|reserved_special_token_903|>"):
        assert herd_tok.token_id(name) == meta_tokenizer.special_tokens[name]
    with pytest.raises(TokenizerError, match="unknown special token '<|nope|>'"):
        herd_tok.token_id("<|nope|>")


def test_pieces_equal_meta(herd_tok, meta_tokenizer):
    for i in [*range(0, 202048, 97), 199999, 200000, 200008, 202047]:
        assert herd_tok.id_to_piece(i) == meta_tokenizer.model.decode_single_token_bytes(i), i
    ids = meta_encode(meta_tokenizer, "<|begin_of_text|>x", bos=True)
    assert herd_tok.decode(ids) == meta_tokenizer.decode(ids)
    assert herd_tok.decode([200000, *herd_tok.encode("hi"), 200008], skip_special=True) == "hi"
    with pytest.raises(TokenizerError, match="out of range"):
        herd_tok.id_to_piece(202048)


def _splits_a_character(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("text", ["🎉🚀✨👩‍👩‍👧‍👦 done", "日本語のテキスト🫠", "naïve café 龘靐齉", "مرحبا 𠜎𠜱𠝹 ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ ꯃꯤꯇꯩ"])
def test_stream_decoder_never_splits_characters(herd_tok, meta_tokenizer, text):
    ids = meta_encode(meta_tokenizer, text)
    # the string really has characters spread over several tokens, so buffering is exercised
    assert any(_splits_a_character(meta_tokenizer.model.decode_single_token_bytes(i)) for i in ids)
    dec = herd_tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == meta_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_invalid_and_unfinished_bytes(herd_tok, meta_tokenizer):
    one = meta_tokenizer.model.encode_single_token
    ids = [one(b"\xf0"), one(b"a"), one(b"\xe6"), one(b"\x97"), one(b"\xa5"), one(b"\xf0"), one(b"\x9f")]
    dec = herd_tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    want = meta_tokenizer.model.decode_bytes(ids).decode("utf-8", errors="replace")  # "\ufffda日\ufffd"
    assert "".join(pieces) == want == herd_tok.decode(ids)
    assert pieces[1] == "\ufffda" and pieces[4] == "日"
    # specials are dropped by default, kept on request
    dec = herd_tok.stream_decoder()
    assert dec.push(200008) == "" and dec.push(one(b"a")) == "a"
    assert herd_tok.stream_decoder(skip_special=False).push(200008) == "<|eot|>"


# ------------------------------------------------------------------------------------ files


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A small byte-level BPE tokenizer.json (built with `tokenizers`), with two added special tokens."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["he"], vocab["ll"], vocab["hell"] = 256, 257, 258
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]

    def build():
        tok = HF(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    tok = build()
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot|>"])  # ids 259, 260
    directory = tmp_path / "tiny"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory, build()  # the reference without added tokens


def test_tokenizer_json_with_config(tiny_hf_dir):
    directory, plain_ref = tiny_hf_dir
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>"},
        "added_tokens_decoder": {"300": {"content": "<|eom|>", "special": True},
                                 "260": {"content": "<|eot|>", "special": True}},
    }))
    tok = Tokenizer.from_dir(directory)
    assert tok.source.endswith("tokenizer.json")
    assert tok.special_tokens == {"<|begin_of_text|>": 259, "<|eot|>": 260, "<|eom|>": 300}
    assert (tok.vocab_size, tok.bos_id, tok.eot_id, tok.eom_id, tok.eos_id, tok.pad_id) == (301, 259, 260, 300, None, None)
    assert tok.stop_ids == [300, 260]
    text = "hello <|eot|> héllo"
    assert tok.encode(text, bos=True) == [259, *plain_ref.encode(text).ids]
    assert tok.encode_with_specials("hell<|eot|>") == [258, 260]
    assert tok.decode(tok.encode(text)) == text


def test_from_dir_order(tmp_path, tiny_hf_dir, meta_model_path):
    import shutil

    assert Tokenizer.from_dir(tmp_path).source.endswith("tokenizer.model")  # empty dir: Meta's default
    shutil.copy(meta_model_path, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).source == str(tmp_path / "tokenizer.model")
    shutil.copy(tiny_hf_dir[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).source == str(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_bad_tokenizer_files(tmp_path, tiny_hf_dir):
    bad = tmp_path / "tokenizer.model"
    for content, match in [
        ("IQ== 0\nnot base64 !!! x\n", "tokenizer.model: line 2 is not '<base64 token> <rank>'"),
        ("IQ== 0\nIg== 5\n", "tokenizer.model: ranks are not 0..1"),
        ("\n\n", "tokenizer.model: empty tokenizer file"),
        ("IQ== 0\nIg== 1\n", "tokenizer.model: lacks single-byte tokens"),
    ]:
        bad.write_text(content)
        with pytest.raises(TokenizerError, match=match):
            Tokenizer.from_tiktoken_file(bad)
    with pytest.raises(TokenizerError, match="missing.model: no such tokenizer file"):
        Tokenizer.from_tiktoken_file(tmp_path / "missing.model")
    js = tmp_path / "tokenizer.json"
    for content in ["{broken", '{"model": 3}', "[]"]:
        js.write_text(content)
        with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
            Tokenizer.from_hf_json(js)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.from_hf_json(tmp_path / "nope.json")
    directory = tiny_hf_dir[0]
    (directory / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not a valid tokenizer_config.json"):
        Tokenizer.from_hf_json(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": {"content": "<|a|>"}}}')
    with pytest.raises(TokenizerError, match="added_tokens_decoder must map"):
        Tokenizer.from_hf_json(directory / "tokenizer.json")
    with pytest.raises(TokenizerError, match="expected a str"):
        Tokenizer.default().encode(b"x")

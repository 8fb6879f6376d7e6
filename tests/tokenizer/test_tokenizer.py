"""Token ids equal Meta's reference tokenizer, for both backends."""

from __future__ import annotations

import pytest
from tok_strings import generated_strings

from herd import TokenizerError
from herd.tokenizer import Tokenizer

STRINGS = generated_strings()


@pytest.mark.parametrize("backend", ["tiktoken", "hf"])
def test_ids_equal_meta_on_generated_strings(backend, meta_tokenizer, herd_tiktoken, herd_hf):
    tok = herd_tiktoken if backend == "tiktoken" else herd_hf
    assert len(STRINGS) >= 1000
    mismatches = []
    for s in STRINGS:
        want = meta_tokenizer.encode(s, bos=False, eos=False)
        got = tok.encode(s)
        if got != want:
            mismatches.append(s[:60])
        assert tok.decode(got) == s
    assert not mismatches, mismatches[:5]


def test_special_tokens_by_name_and_id(herd_tiktoken, herd_hf, meta_tokenizer):
    for tok in (herd_tiktoken, herd_hf):
        assert tok.vocab_size == 202048 if tok is herd_tiktoken else tok.vocab_size >= 201134
        for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|eot|>", "<|eom|>", "<|patch|>",
                     "<|python_start|>", "<|finetune_right_pad|>"):
            assert tok.token_id(name) == meta_tokenizer.special_tokens[name]
        assert (tok.bos_id, tok.eot_id, tok.eom_id) == (200000, 200008, 200007)
        assert tok.stop_ids == [200001, 200007, 200008]
    assert herd_tiktoken.special_tokens == meta_tokenizer.special_tokens
    with pytest.raises(TokenizerError, match="unknown special token"):
        herd_tiktoken.token_id("<|nope|>")


def test_bos_exactly_once_and_no_special_injection(herd_tiktoken, herd_hf):
    for tok in (herd_tiktoken, herd_hf):
        ids = tok.encode("<|begin_of_text|>hi<|eot|>", bos=True)
        assert ids[0] == 200000 and ids.count(200000) == 1
        assert not (set(ids[1:]) & tok.special_ids)
        assert tok.encode_with_specials("<|eot|>") == [200008]


def test_stream_decoder_never_splits_characters(herd_tiktoken, herd_hf):
    for tok in (herd_tiktoken, herd_hf):
        for s in ["🎉🚀✨👩‍👩‍👧‍👦 done", "日本語のテキスト", "naïve café", "مرحبا"]:
            ids = tok.encode(s)
            dec = tok.stream_decoder()
            pieces = [dec.push(i) for i in ids] + [dec.flush()]
            assert "".join(pieces) == s
            assert all("\ufffd" not in p for p in pieces)
        # some character really spans several tokens, so the test exercises the buffering
        assert any(tok.decode([i]) != tok.id_to_piece(i).decode("utf-8", "ignore") for i in tok.encode("🎉👩‍👩‍👧‍👦"))


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 !!! x\n")
    with pytest.raises(TokenizerError, match="tokenizer.model: line 1"):
        Tokenizer.from_tiktoken_file(bad)
    js = tmp_path / "tokenizer.json"
    js.write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_hf_json(js)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.from_tiktoken_file(tmp_path / "missing.model")


def test_from_dir_prefers_tokenizer_json(tmp_path, hf_json_path):
    import shutil

    assert Tokenizer.from_dir(tmp_path).source.endswith("tokenizer.model")  # falls back to the default
    shutil.copy(hf_json_path, tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).source.endswith("tokenizer.json")

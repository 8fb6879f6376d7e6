from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def meta_tokenizer():
    """Meta's reference tokenizer (llama_models)."""
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def herd_tiktoken():
    from herd.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="session")
def hf_json_path(tmp_path_factory, meta_tokenizer):
    """tokenizer.json built from Meta's tiktoken file with transformers' converter (as HF's conversion does)."""
    from pathlib import Path

    import llama_models.llama4 as l4
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(meta_tokenizer.special_tokens, key=meta_tokenizer.special_tokens.get)
    conv = TikTokenConverter(
        vocab_file=str(Path(l4.__file__).parent / "tokenizer.model"),
        pattern=meta_tokenizer.O200K_PATTERN,
        extra_special_tokens=specials,
    )
    tok = conv.converted()
    out = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    tok.save(str(out))
    return out


@pytest.fixture(scope="session")
def herd_hf(hf_json_path):
    from herd.tokenizer import Tokenizer

    return Tokenizer.from_hf_json(hf_json_path)



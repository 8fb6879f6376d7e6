"""Session fixtures for the tokenizer tests: the outside references (Meta's llama_models tokenizer and
ChatFormat, a tokenizer.json converted by transformers, the HF chat template) and herd's tokenizers."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def meta_tokenizer():
    """Meta's reference tokenizer (llama_models)."""
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def meta_model_path():
    import llama_models.llama4 as l4

    return Path(l4.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="session")
def herd_tiktoken():
    from herd.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="session")
def hf_json_path(tmp_path_factory, meta_tokenizer, meta_model_path):
    """tokenizer.json converted from Meta's tiktoken file by transformers' TikTokenConverter, with the o200k
    split regex and all of Meta's special tokens in id order (what HF's conversion script does)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(meta_tokenizer.special_tokens, key=meta_tokenizer.special_tokens.get)
    conv = TikTokenConverter(vocab_file=str(meta_model_path), pattern=meta_tokenizer.O200K_PATTERN, extra_special_tokens=specials)
    out = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    conv.converted().save(str(out))
    return out


@pytest.fixture(scope="session")
def herd_hf(hf_json_path):
    from herd.tokenizer import Tokenizer

    return Tokenizer.from_hf_json(hf_json_path)


@pytest.fixture(scope="session", params=["tiktoken", "hf"])
def herd_tok(request):
    """Each of herd's two backends in turn."""
    return request.getfixturevalue("herd_tiktoken" if request.param == "tiktoken" else "herd_hf")


@pytest.fixture(scope="session")
def meta_chat(meta_tokenizer):
    """(Meta's ChatFormat, llama_models.datatypes). chat_format imports torchvision-backed image transforms at
    module level, which text dialogs never use: stub torchvision only while importing it if it is absent."""
    added = []
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules[name] = stub
            added.append(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        tr = sys.modules["torchvision.transforms"]
        tr.functional = sys.modules["torchvision.transforms.functional"]
        for attr in ("Compose", "ToTensor", "Normalize", "Resize", "InterpolationMode"):
            setattr(tr, attr, object)
    try:
        from llama_models.llama4.chat_format import ChatFormat as MetaChatFormat
    finally:
        for name in added:
            sys.modules.pop(name, None)
    from llama_models import datatypes

    return MetaChatFormat(meta_tokenizer), datatypes


@pytest.fixture(scope="session")
def hf_chat_template():
    """The Llama 4 chat template string from transformers' processing_llama4.py (read, not imported)."""
    origin = importlib.util.find_spec("transformers.models.llama4.processing_llama4").origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "chat_template" for t in node.targets):
            return ast.literal_eval(node.value)
    pytest.fail("no chat_template in transformers' processing_llama4.py")

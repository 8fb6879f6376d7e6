"""Shared fixtures: tiny random Llama 4 checkpoints built with transformers (the reference)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can import builders

from builders import random_hf_model, tiny_text_config  # noqa: E402


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random tiny HF checkpoint -> (model, directory)."""

    def make(name: str = "ckpt", seed: int = 0, max_shard_size: str | None = None, **overrides):
        config = tiny_text_config(**overrides)
        model = random_hf_model(config, seed=seed)
        path = tmp_path / name
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return model, path

    return make


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, for the opt-in `llamacpp` tests (they are deselected unless -m llamacpp is given)."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    return llama_cpp

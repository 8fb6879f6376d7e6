"""Resolve a model source: a local directory, a GGUF file, or a Hugging Face hub id (``org/name``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import HerdError, WeightsError

# What a text model needs from a hub repository; big vision-only or original (.pth) files are skipped.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not os.path.exists(source)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the local cache) the files herd needs; honours HF_HUB_OFFLINE and HF_TOKEN."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as exc:  # network, auth, offline-miss: all become one clear line
        msg = " ".join(str(exc).split())[:300]
        raise WeightsError(f"hub id {repo_id}: cannot fetch the model ({type(exc).__name__}: {msg})") from None
    return Path(path)


def resolve(source: str | os.PathLike) -> tuple[str, Path]:
    """-> (kind, path) with kind in {"hf", "gguf"}."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        if path.name == "config.json":
            return "hf", path.parent
        raise HerdError(f"{path}: unsupported model file (expected a directory with config.json, or a .gguf file)")
    if looks_like_hub_id(text):
        return "hf", download(text)
    raise HerdError(f"{text}: no such file or directory (expected a model directory, a .gguf file or a hub id org/name)")

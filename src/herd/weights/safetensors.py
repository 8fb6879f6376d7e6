"""Lazy reader for Hugging Face safetensors checkpoints: one file or shards with an index.

Tensors are read one at a time from memory-mapped files, so a checkpoint is never held twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import FormatError, WeightsError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class SafetensorsCheckpoint:
    """Name -> file map of a checkpoint directory; tensors are loaded on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = self._discover()
        self.location: dict[str, Path] = {}
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
            except Exception as exc:  # the Rust error type is not importable in every version
                raise FormatError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from None
            for name in names:
                self.location[name] = path
        index = self.directory / INDEX_NAME
        if index.is_file():
            self._check_index(index)

    def _discover(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({self.directory / f for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FormatError(f"{index}: malformed index (expected a JSON object with a weight_map; {_one_line(exc)})") from None
            for f in files:
                if not f.is_file():
                    raise WeightsError(f"{f}: shard listed in {INDEX_NAME} is missing")
            return files
        single = self.directory / SINGLE_NAME
        if single.is_file():
            return [single]
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{self.directory}: no *.safetensors weights found")
        return files

    def _check_index(self, index: Path) -> None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, fname in weight_map.items():
            actual = self.location.get(name)
            if actual is None or actual.name != Path(fname).name:
                raise WeightsError(f"{self.directory / fname}: index lists tensor {name} but the shard lacks it")

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> torch.Tensor:
        path = self.location[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise FormatError(f"{path}: cannot read tensor {name} ({_one_line(exc)})") from None

    def dtype_of(self, name: str) -> torch.dtype:
        path = self.location[name]
        with safe_open(str(path), framework="pt") as f:
            return _DTYPES.get(f.get_slice(name).get_dtype(), torch.float32)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, file by file (one open handle at a time)."""
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except WeightsError:
                raise
            except Exception as exc:
                raise FormatError(f"{path}: cannot read tensors ({_one_line(exc)})") from None


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}

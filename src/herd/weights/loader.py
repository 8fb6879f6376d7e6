"""Assemble a model from named tensors: the one place where checkpoint tensors meet modules.

The model is built on the meta device and each parameter is filled as its tensor arrives, so peak memory
is the model once plus one tensor. Names arrive already canonical (see ``names.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..errors import MissingTensorError, ShapeMismatchError, WeightsError
from ..model import Llama4TextModel
from ..model.layers import RotaryEmbedding, set_weight
from . import names
from .safetensors import SafetensorsCheckpoint

_STACKED = re.compile(r"^(?P<base>.+)\[(?P<e>\d+)\]$")


def empty_model(config: Config) -> Llama4TextModel:
    with torch.device("meta"):
        return Llama4TextModel(config)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return model.get_submodule(path), leaf


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


class ModelAssembler:
    """Receives canonical tensors one by one and checks that each is expected and well shaped."""

    def __init__(self, config: Config, source: str, dtype: torch.dtype | None, device: str | torch.device):
        self.config, self.source, self.dtype, self.device = config, source, dtype, torch.device(device)
        self.model = empty_model(config)
        self.expected = {name: shape for name, shape, _ in names.expected_tensors(config)}
        self.filled: set[str] = set()
        self._stacks: dict[str, dict[int, torch.Tensor]] = {}

    def put(self, name: str, value: Any) -> None:
        m = _STACKED.match(name)
        if m:  # one expert of a per-expert checkpoint: stack once all have arrived
            stack = self._stacks.setdefault(m["base"], {})
            stack[int(m["e"])] = value
            if len(stack) == self.config.num_local_experts:
                self.put(m["base"], torch.stack([stack[e] for e in range(len(stack))]))
                del self._stacks[m["base"]]
            return
        if name not in self.expected:
            return  # e.g. tensors for layers/types this config does not have: ignored like vision
        want = self.expected[name]
        if _shape_of(value) != want:
            raise ShapeMismatchError(
                f"{self.source}: tensor {name} has shape {list(_shape_of(value))}, expected {list(want)} from the config"
            )
        if isinstance(value, torch.Tensor):
            dtype = self.dtype or value.dtype
            if not value.is_floating_point():
                raise WeightsError(f"{self.source}: tensor {name} has dtype {value.dtype}, expected a floating type")
            value = value.to(device=self.device, dtype=dtype).contiguous()
        module, leaf = _owner(self.model, name)
        set_weight(module, leaf, value)
        self.filled.add(name)

    def finish(self) -> Llama4TextModel:
        missing = [n for n in self.expected if n not in self.filled]
        if missing == ["lm_head.weight"] and self.config.tie_word_embeddings:
            set_weight(self.model.lm_head, "weight", self.model.model.embed_tokens.weight)
            missing = []
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingTensorError(f"{self.source}: missing tensor {missing[0]}{more}")
        # Buffers computed from the config, not stored in checkpoints.
        self.model.model.rotary_emb = RotaryEmbedding(self.config).to(self.device)
        embed = self.model.model.embed_tokens
        if isinstance(embed.weight, torch.Tensor) and embed.weight.device.type == "meta":
            raise MissingTensorError(f"{self.source}: missing tensor model.embed_tokens.weight")
        if not isinstance(embed.weight, torch.Tensor):
            embed.compute_dtype = self.dtype  # a quantized table's rows come out in the dense weights' dtype
        return self.model.eval()


def load_safetensors_model(
    directory: str | Path, config: Config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Llama4TextModel:
    ckpt = SafetensorsCheckpoint(directory)
    if dtype is None:
        dtype = _stored_dtype(ckpt)
    asm = ModelAssembler(config, str(directory), dtype, device)
    total = len(ckpt.names())
    for hf_name, tensor in tqdm(ckpt.iter_tensors(), total=total, desc="loading", unit="tensor", leave=False):
        text_name = names.strip_hf_prefix(hf_name)
        if text_name is None:
            continue  # vision tower / projector: not used by the text model yet
        for name, value in names.hf_to_canonical(text_name, tensor):
            asm.put(name, value)
    return asm.finish()


def _stored_dtype(ckpt: SafetensorsCheckpoint) -> torch.dtype:
    """The dtype the checkpoint's embedding table is stored in ("as stored")."""
    for name in ckpt.names():
        text = names.strip_hf_prefix(name)
        if text == "model.embed_tokens.weight":
            return ckpt.dtype_of(name)
    return torch.float32


def iter_model_tensors(model: Llama4TextModel) -> Iterable[tuple[str, Any]]:
    """Canonical (name, weight) pairs of a built model, quantized weights included."""
    for name, _, _ in names.expected_tensors(model.config):
        module, leaf = _owner(model, name)
        yield name, getattr(module, leaf)


def check_safetensors(directory: str | Path, config: Config) -> dict[str, int]:
    """Validate names and shapes from the headers alone (no tensor data read); -> parameters by group."""
    from safetensors import safe_open

    ckpt = SafetensorsCheckpoint(directory)
    asm_expected = {name: (shape, group) for name, shape, group in names.expected_tensors(config)}
    seen: set[str] = set()
    stacks: dict[str, set[int]] = {}
    for hf_name, path in ckpt.location.items():
        text_name = names.strip_hf_prefix(hf_name)
        if text_name is None:
            continue
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice(hf_name).get_shape()
        for name, meta in names.hf_to_canonical(text_name, torch.empty(shape, device="meta")):
            m = _STACKED.match(name)
            if m:
                stacks.setdefault(m["base"], set()).add(int(m["e"]))
                if len(stacks[m["base"]]) == config.num_local_experts:
                    seen.add(m["base"])
                continue
            if name in asm_expected:
                want = asm_expected[name][0]
                if tuple(meta.shape) != want:
                    raise ShapeMismatchError(
                        f"{path}: tensor {name} has shape {list(meta.shape)}, expected {list(want)} from the config"
                    )
                seen.add(name)
    missing = [n for n in asm_expected if n not in seen]
    if missing == ["lm_head.weight"] and config.tie_word_embeddings:
        missing = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensorError(f"{directory}: missing tensor {missing[0]}{more}")
    groups: dict[str, int] = {}
    for name, (shape, group) in asm_expected.items():
        n = 1
        for d in shape:
            n *= d
        groups[group] = groups.get(group, 0) + n
    return groups

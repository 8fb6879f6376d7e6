"""The LLM facade: ``herd.load(source)`` and what a loaded model offers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import HerdError
from .model import Llama4TextModel

_DTYPE_NAMES = {
    "f32": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "f16": torch.float16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise HerdError(f"dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[key]


class LLM:
    """A loaded Llama 4 model with its tokenizer."""

    def __init__(
        self,
        model: Llama4TextModel,
        source: str = "",
        tokenizer: Any = None,
        tokenizer_dir: Path | None = None,
        chat_template: str | None = None,
        generation_defaults: dict | None = None,
    ):
        self.model = model
        self.config: Config = model.config
        self.source = source
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer_factory = None  # set by loaders whose tokenizer is costly to build (GGUF)
        self.chat_template = chat_template
        self.generation_defaults = generation_defaults or {}
        self.last_stats = None

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            if self._tokenizer_factory is not None:
                self._tokenizer = self._tokenizer_factory()
            elif self._tokenizer_dir is not None:
                self._tokenizer = Tokenizer.from_dir(self._tokenizer_dir)
            else:
                self._tokenizer = Tokenizer.default()
        return self._tokenizer

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor[B, T] -> FloatTensor[B, T, vocab], one full forward without a cache."""
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise HerdError(f"input_ids: expected shape [B, T], got {list(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise HerdError(f"input_ids: token ids must be in [0, {self.config.vocab_size})")
        return self.model(input_ids.to(self.device)).float()

    # ------------------------------------------------------------------ generation
    @property
    def context_size(self) -> int:
        return min(self.config.max_position_embeddings, 8192)

    def sampling_params(self, params=None, **overrides):
        """SamplingParams from (in order) explicit overrides, `params`, generation_config.json, Meta's defaults."""
        from .runtime.sampling import SamplingParams

        base = params if params is not None else SamplingParams(**self.generation_defaults)
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in changes and isinstance(changes["stop"], str):
            changes["stop"] = [changes["stop"]]
        return base.with_(**changes).validate()

    def _prompt_ids(self, prompt_or_ids) -> list[int]:
        if isinstance(prompt_or_ids, str):
            return self.tokenizer.encode(prompt_or_ids, bos=True)
        return [int(t) for t in prompt_or_ids]

    def generate(self, prompt_or_ids, params=None, ctx: int | None = None, **sampling):
        """Stream text pieces continuing a raw prompt (no chat template). A str gets BOS; ids are used as is."""
        from .runtime.generate import GenerationStats, generate_text

        p = self.sampling_params(params, **sampling)
        self.last_stats = GenerationStats()
        return generate_text(self.model, self.tokenizer, self._prompt_ids(prompt_or_ids), p, ctx or self.context_size, self.last_stats)

    def complete(self, prompt_or_ids, params=None, ctx: int | None = None, **sampling) -> str:
        return "".join(self.generate(prompt_or_ids, params, ctx, **sampling))

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama 4 chat-format prompt ids, BOS included once."""
        from .tokenizer.chat import ChatFormat

        return ChatFormat(self.tokenizer).encode_dialog(messages, add_generation_prompt=add_generation_prompt)

    def chat_stream(self, messages: list[dict], params=None, ctx: int | None = None, **sampling):
        return self.generate(self.format_chat(messages), params, ctx, **sampling)

    def chat(self, messages: list[dict], params=None, ctx: int | None = None, **sampling) -> dict:
        """One assistant turn as an OpenAI-style message (with tool_calls when the model called a tool)."""
        from .tokenizer.chat import parse_tool_calls

        text = "".join(self.chat_stream(messages, params, ctx, **sampling))
        content, calls = parse_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}
        return {"role": "assistant", "content": text}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LLM(source={self.source!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"experts={c.num_local_experts}, dtype={self.model.model.norm.weight.dtype})"
        )


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> LLM:
    """Load a model from a directory (HF safetensors), a .gguf file, a hub id ``org/name`` or ``"demo"``."""
    from .weights import hub
    from .weights.loader import load_safetensors_model

    torch_dtype = parse_dtype(dtype)
    text = str(source)
    if text == "demo":
        from .weights.demo import demo_path  # the bundled model (see docs/demo-model.md)

        source = demo_path()
        text = str(source)
    if text.lower() in ("scout", "maverick"):
        raise HerdError(f"{text}: a preset config has no weights (use `herd info --preset {text}` to plan with it)")
    kind, path = hub.resolve(source)
    if kind == "gguf":
        from .weights.gguf import load_gguf

        return load_gguf(path, device=device, dtype=torch_dtype)
    config = Config.from_file(path / "config.json")
    model = load_safetensors_model(path, config, dtype=torch_dtype, device=device)
    template = _read_chat_template(path)
    return LLM(model, source=text, tokenizer_dir=path, chat_template=template, generation_defaults=_read_generation(path))


def _read_chat_template(path: Path) -> str | None:
    import json

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = path / name
        if f.is_file():
            try:
                template = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError):
                continue
            if isinstance(template, str):
                return template
    return None


def _read_generation(path: Path) -> dict:
    import json

    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return {k: raw[k] for k in ("temperature", "top_p", "top_k", "min_p") if isinstance(raw, dict) and k in raw}

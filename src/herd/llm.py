"""The LLM facade: ``herd.load(source)`` and what a loaded model offers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import HerdError, RequestError
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
        from .quant.kernels import select_paths

        select_paths(model)  # each quantized weight's CPU execution path, by type (repacked on first use)
        self.source = source
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer_factory = None  # set by loaders whose tokenizer is costly to build (GGUF)
        self.chat_template = chat_template
        self.generation_defaults = generation_defaults or {}
        self.last_stats = None

    def compile(self) -> "LLM":
        """Run one-token decode steps as one compiled graph (``herd.runtime.compiled``): ~1.1-1.2x faster
        decoding on a CPU, after a compile of tens of seconds on the first step (cached on disk after)."""
        from .runtime.compiled import compile_decode

        compile_decode(self.model)
        return self

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
        """The default context: min(max_position_embeddings, 8192)."""
        from .runtime.generate import default_ctx

        return default_ctx(self.config)

    def sampling_params(self, params=None, **overrides):
        """A validated SamplingParams: explicit overrides (None = not given) over `params`, else over the
        model's generation_config.json values, else Meta's defaults (temperature 0.6, top_p 0.9, min_p 0.01)."""
        from .runtime.sampling import SamplingParams

        base = params if params is not None else SamplingParams(**self.generation_defaults)
        changes = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(changes.get("stop"), str):
            changes["stop"] = [changes["stop"]]
        elif isinstance(changes.get("stop"), tuple):
            changes["stop"] = list(changes["stop"])
        return base.with_(**changes).validate()

    def _prompt_ids(self, prompt_or_ids) -> list[int]:
        if isinstance(prompt_or_ids, str):
            return self.tokenizer.encode(prompt_or_ids, bos=True)
        if isinstance(prompt_or_ids, torch.Tensor):
            prompt_or_ids = prompt_or_ids.reshape(-1).tolist()
        try:
            return [int(t) for t in prompt_or_ids]
        except (TypeError, ValueError):
            raise RequestError("prompt: expected a str or a list of token ids") from None

    def generate(
        self,
        prompt_or_ids,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        *,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        params=None,
        ctx: int | None = None,
    ):
        """Stream the text pieces continuing a raw prompt (no chat template): a str is encoded with BOS,
        a list of ids is used as is. Sampling values left None come from `params`, else the model's
        defaults. Stops at <|eot|> / <|eom|> / <|end_of_text|>, a stop string (not emitted) or max_tokens;
        `last_stats` then holds the GenerationStats. Bad requests raise here, before the first piece."""
        from .runtime.generate import GenerationStats, generate_text

        p = self.sampling_params(
            params,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        ids = self._prompt_ids(prompt_or_ids)
        stats = GenerationStats()
        pieces = generate_text(self.model, self.tokenizer, ids, p, ctx or self.context_size, stats)
        self.last_stats = stats
        return pieces

    def complete(self, prompt_or_ids, **sampling) -> str:
        """The whole completion of a raw prompt as one string (same arguments as `generate`)."""
        return "".join(self.generate(prompt_or_ids, **sampling))

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama 4 chat-format prompt ids, BOS included once."""
        from .tokenizer.chat import ChatFormat

        return ChatFormat(self.tokenizer).encode_dialog(messages, add_generation_prompt=add_generation_prompt)

    def chat_stream(self, messages: list[dict], **sampling):
        """Stream the text pieces of the next assistant turn (same sampling arguments as `generate`)."""
        return self.generate(self.format_chat(messages), **sampling)

    def chat(self, messages: list[dict], **sampling) -> dict:
        """The next assistant turn as an OpenAI-style message: {"role": "assistant", "content": ...}, plus
        "tool_calls" when the model called a tool (content is then the text around the call, or None)."""
        from .tokenizer.chat import parse_tool_calls

        text = "".join(self.chat_stream(messages, **sampling))
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
    if not isinstance(raw, dict):
        return {}
    if raw.get("do_sample") is False:  # transformers' greedy switch: the sampling values are then ignored
        return {"temperature": 0.0}
    return {k: raw[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in raw}

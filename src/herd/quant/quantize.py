"""Quantize a model to a GGUF with a plan (preset, rules, or auto allocation), streaming tensor by tensor.

The source is an HF checkpoint (tensors read one at a time from safetensors), a GGUF (requantized from its
blocks, which stay memory-mapped) or an already loaded ``herd.LLM``. Writing goes through
``weights.gguf_write.write_gguf``: atomic, with progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..errors import HerdError
from .plan import Plan


@dataclass
class Source:
    config: Config
    tensors: Any  # what write_gguf takes: a getter, mapping or (name, value) pairs
    tokenizer: Any
    chat_template: str | None
    name: str


def open_source(model: Any) -> Source:
    """A model path ("demo", HF dir, .gguf, hub id) or a loaded herd.LLM -> what the writer needs."""
    from ..llm import LLM

    if isinstance(model, LLM):
        return _from_llm(model)
    from ..weights import hub

    text = str(model)
    if text == "demo":
        from ..weights.demo import demo_path

        text = str(demo_path())
    kind, path = hub.resolve(text)
    if kind == "gguf":
        import herd

        return _from_llm(herd.load(path))
    from ..llm import _read_chat_template
    from ..weights.gguf_write import hf_tensor_getter
    from ..weights.loader import check_safetensors

    config = Config.from_file(path / "config.json")
    check_safetensors(path, config)  # fail before any work on a bad checkpoint
    return Source(config, hf_tensor_getter(path, config), path, _read_chat_template(path), path.name)


def _from_llm(llm) -> Source:
    from ..weights.loader import iter_model_tensors

    tokenizer = getattr(llm, "gguf", None) or getattr(llm, "tokenizer_dir", None) or llm.tokenizer
    name = Path(str(llm.source)).stem if llm.source else "model"
    return Source(llm.config, dict(iter_model_tensors(llm.model)), tokenizer, llm.chat_template, name)


def imatrix_kv(imatrix) -> Callable:
    """llama-quantize's record of the imatrix used, as an ``extra_kv`` hook for the writer."""
    from ..weights.gguf_write import T_I32

    def add(kv) -> None:
        kv.string("quantize.imatrix.file", str(imatrix.path or "herd"))
        kv.string("quantize.imatrix.dataset", ",".join(imatrix.datasets) or "unknown")
        kv.add("quantize.imatrix.entries_count", T_I32, len(imatrix.entries))  # i32, as llama-quantize writes it
        kv.add("quantize.imatrix.chunks_count", T_I32, int(imatrix.chunk_count))

    return add


def predicted_size(source: Source, plan: Plan, imatrix=None) -> int:
    from ..weights.gguf_write import planned_size

    return planned_size(source.config, plan.types(), source.tokenizer, source.chat_template, name=source.name,
                        file_type=plan.file_type or 0, extra_kv=imatrix_kv(imatrix) if imatrix else None)


def quantize(source: Source, out: str | Path, plan: Plan, imatrix=None, progress: bool = True) -> list[Path]:
    """Write `source` quantized by `plan` to `out` (with the imatrix's importance when given)."""
    from ..weights.gguf_write import write_gguf

    plan.check_encodable()
    importance = imatrix.importance() if imatrix is not None else None
    return write_gguf(
        out, source.config, source.tensors, source.tokenizer, chat_template=source.chat_template,
        qtypes=plan.types(), importance=importance, file_type=plan.file_type, name=source.name,
        extra_kv=imatrix_kv(imatrix) if imatrix is not None else None, progress=progress,
    )


def check_imatrix_covers(plan: Plan, imatrix) -> None:
    """llama-quantize refuses IQ1/IQ2 targets without importance data; so does herd (named tensor)."""
    from . import formats

    have = imatrix.importance() if imatrix is not None else {}
    for e in plan.entries:
        f = formats.format_of(e.qtype)
        if f.needs_imatrix and e.name not in have and e.group not in ("embeddings", "output"):
            raise HerdError(f"tensor {e.gguf}: {f.name} needs an importance matrix (--imatrix)")


__all__ = ["Source", "open_source", "quantize", "predicted_size", "imatrix_kv", "check_imatrix_covers"]

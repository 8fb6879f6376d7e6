"""Single-request generation: prefill, then decode with the KV cache, streaming text pieces.

``TextStream`` (token ids -> text, with stop strings) is shared with the HTTP server's batched path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import ContextOverflowError
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of the prefill; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, {self.prefill_tok_s:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tok_s:.1f} tok/s | finish: {self.finish_reason}"
        )


class TextStream:
    """Token ids -> text pieces, cut at the first stop string (which is not emitted).

    Text that could be the start of a stop string is held back until it is known not to be one, so a stop
    string spanning several tokens never leaks out.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    best = max(best, n)
                    break
        return best

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.decoder.push(token_id)
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out, True
        keep = self._held_back(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self.pending + self.decoder.flush()
        self.pending = ""
        for stop in self.stops:
            i = out.find(stop)
            if i >= 0:
                out = out[:i]
        return out


@torch.inference_mode()
def generate_tokens(
    model, prompt_ids: list[int], params: SamplingParams, stop_ids: Sequence[int], ctx: int, stats: GenerationStats
) -> Iterator[int]:
    """Yield sampled token ids (stop ids included as the last one) until a stop id or max_tokens."""
    if not prompt_ids:
        raise ContextOverflowError("the prompt is empty (at least one token is needed)")
    if len(prompt_ids) + params.max_tokens > ctx:
        raise ContextOverflowError(
            f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceeds the context of {ctx} tokens"
        )
    sampler = Sampler(params)
    history = list(prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    stop = set(stop_ids)
    device = model.model.norm.weight.device if hasattr(model, "model") else "cpu"
    t0 = time.perf_counter()
    cache = model.new_cache(1)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)[0, -1]
    token = sampler.sample(logits, history)
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats.finish_reason = "length"
    while True:
        stats.generated_tokens += 1
        history.append(token)
        stats.decode_s = time.perf_counter() - t1
        if token in stop:
            stats.finish_reason = "stop"  # set before yielding: the consumer usually stops reading here
        yield token
        if token in stop or stats.generated_tokens >= params.max_tokens:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache, last_only=True)[0, -1]
        token = sampler.sample(logits, history)


def generate_text(
    model, tokenizer, prompt_ids: list[int], params: SamplingParams, ctx: int, stats: GenerationStats
) -> Iterator[str]:
    """Stream text pieces; stops at the tokenizer's stop ids, the params' stop strings or max_tokens."""
    text = TextStream(tokenizer, params.stop)
    stop_ids = set(tokenizer.stop_ids)
    tokens = generate_tokens(model, prompt_ids, params, stop_ids, ctx, stats)
    for token in tokens:
        if token in stop_ids:
            break
        piece, stopped = text.push(token)
        if piece:
            yield piece
        if stopped:
            stats.finish_reason = "stop"
            tokens.close()
            return
    tail = text.flush()
    if tail:
        yield tail

"""Single-request generation: prefill the prompt into a KV cache, then decode one token at a time.

`generate_tokens` is the token loop (ids in, ids out); `TextStream` is the text side (incremental UTF-8
decoding plus stop strings, reused by the HTTP server for its batched requests); `generate_text`
joins the two and is what `LLM.generate` returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ContextOverflowError, RequestError
from .sampling import Sampler, SamplingParams

__all__ = ["GenerationStats", "TextStream", "default_ctx", "check_request", "generate_tokens", "generate_text"]


def default_ctx(config) -> int:
    """The default context window: min(max_position_embeddings, 8192)."""
    return min(int(config.max_position_embeddings), 8192)


@dataclass
class GenerationStats:
    """Filled in while a generation runs; complete once its iterator is exhausted."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop" (stop token or stop string) | "length" (max_tokens)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second of the time after prefill (decode forwards + sampling)."""
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, {self.prefill_tok_s:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tok_s:.1f} tok/s"
        )


class TextStream:
    """Token ids -> text pieces, with stop strings.

    ``push(id)`` returns ``(text, stopped)``: the text that can be shown now, and whether a stop string
    has been completed (the stop string and anything after it are never returned; later pushes return
    ``("", True)``). Text that could be the start of a stop string is held back until the next tokens
    show it is not; stop strings may span several tokens. ``flush()`` returns what is still held back
    once no more tokens come ("" after a stop). Special tokens decode to nothing.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in (stop_strings or ()) if s]
        self.pending = ""  # decoded text not yet returned
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.decoder.push(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        if not self.stops:
            self.pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending, self.stopped = "", True
            return text[:cut], True
        keep = 0 if final else self._held(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def check_request(prompt_ids: list[int], max_tokens: int, ctx: int, vocab_size: int | None = None) -> None:
    """Raise (one line) for an empty prompt, out-of-range ids or a prompt + max_tokens over the context."""
    if not prompt_ids:
        raise RequestError("prompt: empty (at least one token is needed)")
    if vocab_size is not None and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size):
        raise RequestError(f"prompt: token ids must be in [0, {vocab_size})")
    if len(prompt_ids) + max_tokens > ctx:
        raise ContextOverflowError(
            f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} exceeds the context of {ctx} tokens"
        )


def generate_tokens(
    model,
    prompt_ids: list[int],
    sampler: Sampler,
    max_tokens: int,
    stop_ids: Iterable[int] = (),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield sampled token ids: prefill once (last position only), then one cached forward per token.

    A stop id ends the generation (finish_reason "stop") and is not yielded; `max_tokens` ends it with
    "length". Each model step runs under inference mode, which is not held across the yields.
    """
    stats = stats if stats is not None else GenerationStats()
    stop = frozenset(int(i) for i in stop_ids)
    history = list(prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    device = model.model.embed_tokens.weight.device

    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = model.new_cache(1)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits = model(ids, cache=cache, last_only=True)[0, -1].float().cpu()  # .cpu() waits for the device
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0

    while True:
        with torch.inference_mode():
            token = sampler.sample(logits, history)
        if token in stop:
            stats.finish_reason = "stop"
            break
        history.append(token)
        stats.generated_tokens += 1
        stats.decode_s = time.perf_counter() - t1
        yield token
        if stats.generated_tokens >= max_tokens:
            stats.finish_reason = "length"
            break
        with torch.inference_mode():
            step = torch.tensor([[token]], dtype=torch.long, device=device)
            logits = model(step, cache=cache, last_only=True)[0, -1].float().cpu()
    stats.decode_s = time.perf_counter() - t1


def generate_text(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    ctx: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Stream the text pieces continuing `prompt_ids`. The request is checked now (RequestError,
    ContextOverflowError), before the first piece; `stats` is filled while the iterator runs."""
    params.validate()
    ctx = ctx or default_ctx(model.config)
    prompt_ids = [int(t) for t in prompt_ids]
    check_request(prompt_ids, params.max_tokens, ctx, model.config.vocab_size)
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params, model.config.vocab_size)
    return _text_pieces(model, tokenizer, prompt_ids, sampler, params, stats)


def _text_pieces(model, tokenizer, prompt_ids, sampler, params, stats) -> Iterator[str]:
    stream = TextStream(tokenizer, params.stop)
    tokens = generate_tokens(model, prompt_ids, sampler, params.max_tokens, tokenizer.stop_ids, stats)
    for token in tokens:
        text, stopped = stream.push(token)
        if text:
            yield text
        if stopped:
            tokens.close()  # runs no further forward; the timing ends here
            stats.finish_reason = "stop"
            return
    tail = stream.flush()
    if tail:
        yield tail

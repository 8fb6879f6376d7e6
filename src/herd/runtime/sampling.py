"""Sampling: one `SamplingParams` dataclass carries the knobs from every front end (Python API, CLI, HTTP
server) to one `Sampler`, which turns a logits row into the next token id.

The chain (Meta's reference `llama_models/llama4/generation.py`, and the order of transformers'
`generate` logits processors)::

    penalties -> temperature -> top_k -> top_p -> min_p -> sample

1. penalties, over the token history the caller passes (prompt + generated so far):
   repetition (CTRL / transformers style: a positive logit is divided by the penalty, a negative one
   multiplied), then presence (``- presence_penalty`` once a token occurred) and frequency
   (``- frequency_penalty * count``), as OpenAI defines them;
2. temperature: ``logits / temperature``; temperature 0 means greedy (argmax of the penalized logits,
   the rest of the chain is skipped);
3. top_k: keep the k largest logits (0 = off);
4. top_p (nucleus, Meta's rule): sort the probabilities, keep a token while
   ``cumsum - p_i <= top_p`` (so the most likely token always stays), renormalize;
5. min_p: drop tokens whose probability is below ``min_p * p_max``;
6. draw one token from what is left with the sampler's own seeded ``torch.Generator``.

How this compares to llama.cpp. llama.cpp's common default chain is
``penalties, dry, top_n_sigma, top_k, typical, top_p, min_p, xtc, temperature, dist``: it applies the
temperature *last*, so its top_p and min_p cut the temperature-1 distribution, and the temperature only
reshapes the tokens that survived. herd applies the temperature *before* the truncation, as Meta's
reference and transformers do, so top_p and min_p see the tempered distribution. top_k is unaffected
(scaling keeps the order), but at Meta's recommended temperature 0.6 the tempered distribution is
sharper than the raw one, so the nucleus of top_p 0.9 and the min_p 0.01 cut-off keep fewer tokens than
llama.cpp would with the same numbers. herd follows Meta because Llama 4's recommended values
(temperature 0.6, top_p 0.9) were chosen for Meta's order; with llama.cpp's order the same flags give a
somewhat more varied output. Other differences: herd has no DRY, top-n-sigma, typical or XTC samplers,
and its penalties look at the whole history passed in (llama.cpp: the last 64 tokens, ``repeat_last_n``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import RequestError

__all__ = ["SamplingParams", "Sampler", "apply_penalties"]


@dataclass
class SamplingParams:
    """Sampling settings; the defaults are Meta's recommended ones (temperature 0.6, top_p 0.9, min_p 0.01)."""

    temperature: float = 0.6
    top_p: float = 0.9
    min_p: float = 0.01
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def with_(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (unknown names raise RequestError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise RequestError(f"sampling: unknown parameter {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Raise RequestError (one line naming the field) for an invalid value; return self."""
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        _integer("top_k", self.top_k, lo=0)
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _integer("seed", self.seed)
        _integer("max_tokens", self.max_tokens, lo=1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise RequestError(f"stop: expected a list of strings, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop: expected non-empty strings, got {s!r}")
        self.stop = list(self.stop)
        return self


def greedy(logits: torch.Tensor) -> int:
    """Index of the largest of 1-D `logits` (the first on ties, as argmax). On a CPU float32 vector this is
    numpy's argmax (bf16/f16 widened to float32 first, exactly): its SIMD loop takes ~16 us on a 202k
    vocabulary where torch's ``max(dim)`` takes ~0.4 ms and ``argmax`` ~0.6 ms, a measurable part of a
    decode step. A NaN counts as the largest in both."""
    if logits.device.type == "cpu" and logits.dim() == 1 and logits.is_floating_point():
        return int(logits.detach().float().numpy().argmax())
    return int(logits.max(dim=-1).indices)


def _number(name: str, value, lo=None, hi=None, lo_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise RequestError(f"{name}: must be {bound}" + (f" and <= {hi}" if hi is not None else "") + f", got {value!r}")
    if hi is not None and value > hi:
        raise RequestError(f"{name}: must be <= {hi}, got {value!r}")


def _integer(name: str, value, lo=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}: expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise RequestError(f"{name}: must be >= {lo}, got {value!r}")


def apply_penalties(logits: torch.Tensor, history, params: SamplingParams) -> torch.Tensor:
    """Repetition, presence and frequency penalties over the tokens in `history` (a new tensor)."""
    rep, pres, freq = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    if not len(history) or (rep == 1.0 and pres == 0.0 and freq == 0.0):
        return logits
    logits = logits.clone()
    ids = torch.as_tensor(list(history), dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]]
    seen = counts > 0
    if rep != 1.0:
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / rep, picked * rep)
    if pres != 0.0:
        logits -= pres * seen.to(logits.dtype)
    if freq != 0.0:
        logits -= freq * counts.to(logits.dtype)
    return logits


class Sampler:
    """Picks the next token from one logits row; owns a seeded generator (same seed -> same tokens)."""

    def __init__(self, params: SamplingParams, vocab_size: int | None = None):
        self.params = params
        self.vocab_size = vocab_size
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def _prepare(self, logits: torch.Tensor, history) -> torch.Tensor:
        row = logits.detach().reshape(-1).float().cpu()
        if self.vocab_size is not None:
            row = row[: self.vocab_size]
        return apply_penalties(row, history, self.params)

    def candidates(self, logits: torch.Tensor, history=()) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids) of the tokens the chain keeps, most likely first; the probabilities
        sum to 1. Needs temperature > 0.

        Sorting the whole 202k vocabulary for top_p costs more than the model's forward on small models,
        so the kept set is found with a growing ``topk``: a prefix of the sorted tokens already holds the
        whole nucleus once its mass exceeds top_p, or all of min_p's survivors once its last token is
        below ``min_p * p_max``; the result is the same as with a full sort.
        """
        p = self.params
        probs = torch.softmax(self._prepare(logits, history) / p.temperature, dim=-1)
        vocab = probs.shape[0]
        if 0 < p.top_k < vocab:
            vals, ids = torch.topk(probs, p.top_k)
            vals = vals / vals.sum()
        elif p.top_p >= 1.0 and p.min_p <= 0.0:
            return probs, torch.arange(vocab)  # nothing to cut: the order does not matter
        else:
            k = min(vocab, 256)
            while True:
                vals, ids = torch.topk(probs, k)
                if k == vocab:
                    break
                if p.top_p < 1.0 and float(vals.sum()) > p.top_p:
                    break
                if p.min_p > 0.0 and float(vals[-1]) < p.min_p * float(vals[0]):
                    break
                k = min(vocab, k * 8)
        if p.top_p < 1.0:
            keep = (torch.cumsum(vals, dim=-1) - vals) <= p.top_p  # the first token always stays
            vals, ids = vals[keep], ids[keep]
            vals = vals / vals.sum()
        if p.min_p > 0.0:
            keep = vals >= p.min_p * vals[0]
            vals, ids = vals[keep], ids[keep]
            vals = vals / vals.sum()
        return vals, ids

    def probs(self, logits: torch.Tensor, history=()) -> torch.Tensor:
        """The distribution the sampler draws from, over the whole vocabulary (zeros outside the kept set)."""
        vals, ids = self.candidates(logits, history)
        return torch.zeros(self._prepare(logits, ()).shape[0]).scatter_(0, ids, vals)

    def sample(self, logits: torch.Tensor, history=()) -> int:
        """logits [V] (any device/dtype), history: token ids so far -> the next token id."""
        if self.params.temperature == 0:
            return greedy(self._prepare(logits, history))
        vals, ids = self.candidates(logits, history)
        # inverse CDF with our own generator (torch.multinomial is slow on a 202k row)
        cdf = torch.cumsum(vals, dim=-1)
        u = torch.rand(1, generator=self.generator, dtype=cdf.dtype) * cdf[-1]
        pos = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
        return int(ids[pos])

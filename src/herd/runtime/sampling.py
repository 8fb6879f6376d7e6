"""Sampling: one ``SamplingParams`` dataclass from every front end, one ``Sampler`` per request.

Chain order (herd): penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p ->
min-p -> draw. Temperature 0 means greedy (argmax of the penalised logits).

llama.cpp's default chain (common/common.h) is penalties -> DRY -> top-n-sigma -> top-k -> typical ->
top-p -> min-p -> XTC -> temperature -> draw: it truncates on the *untempered* distribution and applies
temperature last. herd instead follows Meta's reference (``llama_models`` generation: ``softmax(logits /
temperature)`` then top-p), the distribution Llama 4's recommended settings (0.6 / 0.9 / 0.01) were
chosen with. The two agree at temperature 1; at 0.6 herd's top-p and min-p keep fewer tokens than
llama.cpp's for the same numbers. DRY, XTC, typical and top-n-sigma are not implemented.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch

from ..errors import RequestError

META_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "min_p": 0.01}


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    min_p: float = 0.01
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # llama.cpp's --repeat-penalty: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once per seen token
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        def bad(name: str, expected: str):
            raise RequestError(f"{name} = {getattr(self, name)!r}: expected {expected}")

        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            bad("temperature", "a number in [0, 100]")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 10:
            bad("repetition_penalty", "a number in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            bad("max_tokens", "an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "an integer or null")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        return self

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Penalised copy of 1-D logits given the tokens seen so far (prompt + generated)."""
    if not history or (
        params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
    ):
        return logits
    ids, counts = torch.unique(torch.tensor(list(history), dtype=torch.long, device=logits.device), return_counts=True)
    ids_ok = ids < logits.shape[-1]
    ids, counts = ids[ids_ok], counts[ids_ok]
    out = logits.clone()
    seen = out[ids]
    if params.repetition_penalty != 1.0:
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    seen = seen - params.presence_penalty - params.frequency_penalty * counts.to(seen.dtype)
    out[ids] = seen
    return out


def filter_probs(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Zero every token top-k / top-p / min-p exclude (1-D probabilities), without renormalising."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k and params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        keep &= probs >= kth
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p (the first token always stays)
        before = torch.cumsum(sorted_p, 0) - sorted_p
        sorted_keep = before < params.top_p
        top_p_keep = torch.zeros_like(keep)
        top_p_keep[order] = sorted_keep
        keep &= top_p_keep
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs.max()
    return torch.where(keep, probs, torch.zeros_like(probs))


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int | None = None):
        self.params = params
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def probabilities(self, logits: torch.Tensor, history: Sequence[int] = ()) -> torch.Tensor:
        """The distribution a draw is made from (after the whole chain), 1-D, summing to 1."""
        p = self.params
        logits = apply_penalties(logits.float().reshape(-1), history, p)
        if p.temperature == 0:
            out = torch.zeros_like(logits)
            out[torch.argmax(logits)] = 1.0
            return out
        probs = torch.softmax(logits / p.temperature, dim=-1)
        probs = filter_probs(probs, p)
        return probs / probs.sum()

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(apply_penalties(logits.float().reshape(-1), history, self.params)))
        probs = self.probabilities(logits, history)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

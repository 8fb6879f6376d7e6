"""Sampler and SamplingParams: seeded determinism, the truncation sets, greedy, exact penalties."""

from __future__ import annotations

import math

import pytest
import torch

from herd.errors import RequestError
from herd.runtime.sampling import Sampler, SamplingParams, apply_penalties, greedy


def logits_of(probs):
    return torch.tensor([math.log(p) for p in probs])


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000, history=()) -> torch.Tensor:
    sampler = Sampler(params, logits.shape[-1])
    return torch.tensor([sampler.sample(logits, history) for _ in range(n)])


def test_defaults_are_metas():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.min_p, p.top_k) == (0.6, 0.9, 0.01, 0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.max_tokens == 256 and p.stop == []
    assert p.validate() is p


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
        ("min_p", -0.01), ("min_p", 2.0), ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("seed", "x"), ("max_tokens", 0),
        ("max_tokens", True), ("stop", [""]), ("stop", [3]), ("stop", 5),
    ],
)
def test_validate_rejects_with_one_line(field, value):
    with pytest.raises(RequestError) as err:
        SamplingParams(**{field: value}).validate()
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_with_rejects_unknown_names():
    assert SamplingParams().with_(top_k=5).top_k == 5
    with pytest.raises(RequestError, match="typo"):
        SamplingParams().with_(typo=1)


def test_same_seed_same_tokens_other_seed_other_tokens():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(1000, generator=gen) for _ in range(40)]
    params = SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0, seed=1234)

    def run(p):
        s = Sampler(p, 1000)
        return [s.sample(r) for r in rows]

    assert run(params) == run(params)
    assert run(params) != run(params.with_(seed=4321))


def test_temperature_zero_is_argmax():
    gen = torch.Generator().manual_seed(1)
    sampler = Sampler(SamplingParams(temperature=0.0), 5000)
    for _ in range(20):
        row = torch.randn(5000, generator=gen)
        assert sampler.sample(row) == int(row.argmax())
    # logits padded past the vocabulary are never picked
    padded = torch.cat([torch.zeros(10), torch.full((6,), 100.0)])
    assert Sampler(SamplingParams(temperature=0.0), 10).sample(padded) < 10


def test_top_k_never_leaves_the_k_largest():
    probs = [0.05, 0.3, 0.1, 0.25, 0.2, 0.1]
    got = draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=0), logits_of(probs))
    assert set(got.tolist()) == {1, 3, 4}


def test_top_p_keeps_metas_nucleus():
    # cumsum - p_i = 0, 0.5, 0.8, 0.95: top_p 0.75 keeps tokens 0 and 1 only
    probs = [0.5, 0.3, 0.15, 0.05]
    got = draws(SamplingParams(temperature=1.0, top_p=0.75, min_p=0.0, seed=0), logits_of(probs), n=4000)
    assert set(got.tolist()) == {0, 1}
    assert abs((got == 0).float().mean().item() - 0.5 / 0.8) < 0.04  # renormalized
    kept = Sampler(SamplingParams(temperature=1.0, top_p=0.75, min_p=0.0), 4).probs(logits_of(probs))
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)


def test_min_p_drops_tokens_below_the_scaled_max():
    probs = [0.5, 0.3, 0.15, 0.05]  # min_p 0.2 -> threshold 0.1 drops token 3
    got = draws(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.2, seed=0), logits_of(probs))
    assert set(got.tolist()) == {0, 1, 2}


def test_temperature_comes_before_top_p():
    # at T=1 top_p 0.65 keeps {0, 1}; at T=0.5 the tempered distribution is (0.78, 0.20, 0.02) -> {0}
    logits = logits_of([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0, top_p=0.65, min_p=0.0, seed=0)
    assert set(draws(p, logits, n=500).tolist()) == {0, 1}
    assert set(draws(p.with_(temperature=0.5), logits, n=500).tolist()) == {0}


def test_penalties_exact_values():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    history = [0, 1, 1]
    rep = apply_penalties(logits, history, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0]
    pres = apply_penalties(logits, history, SamplingParams(presence_penalty=0.5))
    assert pres.tolist() == [1.5, -1.5, 0.5, 3.0]
    freq = apply_penalties(logits, history, SamplingParams(frequency_penalty=0.25))
    assert freq.tolist() == [1.75, -1.5, 0.5, 3.0]
    both = apply_penalties(
        logits, history, SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    )
    assert both.tolist() == [0.25, -3.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the input is not modified
    assert apply_penalties(logits, [], SamplingParams(repetition_penalty=2.0)) is logits


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([3.0, 2.0])
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 2)
    assert sampler.sample(logits, []) == 0
    assert sampler.sample(logits, [0]) == 1


def reference_probs(logits, p: SamplingParams) -> torch.Tensor:
    """The chain written plainly: full sort, Meta's top_p, then min_p."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    sp, order = torch.sort(probs, descending=True)
    sp[(torch.cumsum(sp, -1) - sp) > p.top_p] = 0
    probs = torch.zeros_like(probs).scatter_(0, order, sp)
    probs /= probs.sum()
    probs[probs < p.min_p * probs.max()] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
@pytest.mark.parametrize("top_p,min_p,top_k", [(0.9, 0.01, 0), (0.5, 0.0, 0), (1.0, 0.05, 0), (0.8, 0.02, 50)])
def test_fast_truncation_equals_full_sort(scale, top_p, min_p, top_k):
    logits = torch.randn(20000, generator=torch.Generator().manual_seed(3)) * scale
    p = SamplingParams(temperature=0.7, top_p=top_p, min_p=min_p, top_k=top_k)
    got = Sampler(p, 20000).probs(logits)
    assert torch.allclose(got, reference_probs(logits, p), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_torch_argmax_first_on_ties(dtype):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randint(-50, 50, (202048,), generator=g).to(dtype)  # many ties of the largest value
        assert greedy(logits) == int(torch.argmax(logits)) == int((logits == logits.max()).nonzero()[0])
    logits = torch.zeros(10, dtype=dtype)
    logits[[3, 7]] = float("nan")
    assert greedy(logits) == 3  # a NaN wins, as in torch.max

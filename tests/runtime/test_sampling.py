"""Sampling chain: exact penalties, truncation never escapes its set, seeds reproduce, temperature 0 = argmax."""

from __future__ import annotations

import pytest
import torch

from herd import RequestError
from herd.runtime.sampling import Sampler, SamplingParams, apply_penalties

# a known distribution over 8 tokens
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005])
LOGITS = PROBS.log()


def draws(params, n=3000, history=()):
    s = Sampler(params)
    return {s.sample(LOGITS, history) for _ in range(n)}


def test_temperature_zero_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    s = Sampler(SamplingParams(temperature=0))
    assert s.sample(logits) == int(logits.argmax())


def test_fixed_seed_same_tokens():
    a = [Sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0, seed=7)).sample(LOGITS) for _ in range(1)]
    s1, s2 = Sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0, seed=7)), Sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0, seed=7))
    seq1 = [s1.sample(LOGITS) for _ in range(50)]
    seq2 = [s2.sample(LOGITS) for _ in range(50)]
    assert seq1 == seq2 and len(set(seq1)) > 1 and a[0] == seq1[0]


def test_top_k_never_outside():
    assert draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)) == {0, 1, 2}


def test_top_p_never_outside():
    # mass before token i: 0, .40, .65, .80 -> with top_p 0.7 tokens 0..2 stay (.65 < .7), token 3 (.80) goes
    assert draws(SamplingParams(temperature=1.0, top_p=0.7, min_p=0.0)) == {0, 1, 2}


def test_min_p_never_outside():
    # min_p 0.3 keeps p >= 0.12: tokens 0, 1, 2
    assert draws(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.3)) == {0, 1, 2}


def test_temperature_is_applied_before_truncation():
    # at T=0.5 the distribution sharpens: p ∝ p^2 -> token 0 alone holds 0.40²/Σp² ≈ 0.60 > top_p 0.55
    assert draws(SamplingParams(temperature=0.5, top_p=0.55, min_p=0.0)) == {0}


def test_probabilities_sum_to_one_and_follow_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0))
    assert torch.allclose(s.probabilities(LOGITS), PROBS, atol=1e-6)


def test_penalties_exact_values():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_penalties(logits, [0, 1, 1, 3, 3, 3], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    # token 0: 2/2 - .5 - .25*1 = .25; token 1: -1*2 - .5 - .25*2 = -3; token 2 untouched; token 3: 3/2 - .5 - .75 = .25
    assert torch.allclose(out, torch.tensor([0.25, -3.0, 0.5, 0.25]))
    assert torch.equal(apply_penalties(logits, [0, 1], SamplingParams()), logits)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0), ("top_k", -1), ("max_tokens", 0),
     ("presence_penalty", 3.0), ("stop", [""])],
)
def test_invalid_values_are_one_line_errors(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value}).validate()


def test_meta_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.min_p) == (0.6, 0.9, 0.01)

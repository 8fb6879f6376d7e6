"""Continuous batching: every request gets exactly the tokens it would get alone (greedy)."""

from __future__ import annotations

import torch

import herd
from herd.runtime.engine import Engine


class Greedy:
    def sample(self, logits, history):
        return int(torch.argmax(logits))


def greedy_alone(model, prompt, n):
    out = []
    with torch.inference_mode():
        cache = model.new_cache(1)
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
        for _ in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)[0, -1]
    return out


def drain(req, timeout=60):
    tokens = []
    while True:
        kind, value = req.events.get(timeout=timeout)
        if kind == "token":
            tokens.append(value)
        elif kind == "done":
            return tokens, value
        else:
            raise AssertionError(value)


def test_eight_concurrent_requests_match_running_alone(hf_checkpoint):
    _, path = hf_checkpoint()
    model = herd.load(path).model
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 1, 12, 25, 6)]
    lengths = [12, 5, 20, 8, 15, 3, 10, 18]
    steps = []
    engine = Engine(model, max_batch=4, ctx=128, on_step=steps.append).start()
    try:
        reqs = [engine.submit(p, Greedy(), n, stop_ids=()) for p, n in zip(prompts, lengths)]
        results = [drain(r) for r in reqs]
    finally:
        engine.stop()
    for (tokens, reason), p, n in zip(results, prompts, lengths):
        assert reason == "length"
        assert tokens == greedy_alone(model, p, n)
    assert max(steps) == 4  # really batched, bounded by max_batch


def test_cancel_frees_the_slot_and_stop_ids_end_a_request(hf_checkpoint):
    _, path = hf_checkpoint()
    model = herd.load(path).model
    prompt = [5, 6, 7]
    first = greedy_alone(model, prompt, 4)
    engine = Engine(model, max_batch=1, ctx=4096).start()
    try:
        long = engine.submit(prompt, Greedy(), 4000, stop_ids=())
        queued = engine.submit(prompt, Greedy(), 10, stop_ids={first[2]})
        kind, _ = long.events.get(timeout=30)
        assert kind == "token"
        long.cancel()  # the only slot is freed, so the queued request runs
        tokens, reason = drain(queued)
        assert reason == "stop" and tokens == first[:3]
        assert drain(long)[1] == "cancelled"
    finally:
        engine.stop()

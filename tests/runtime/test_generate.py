"""Generation against transformers' greedy argmax chain; stop strings, limits, stats."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.runtime.generate import TextStream


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from builders import random_hf_model, real_vocab_config

    cfg = real_vocab_config()
    hf = random_hf_model(cfg, seed=1, std=0.5)
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, herd.load(path)


def test_greedy_20_tokens_equal_transformers_argmax_chain(tiny):
    hf, llm = tiny
    prompt = llm.tokenizer.encode("The capital of France is", bos=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(20):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    want = ids[0, len(prompt):].tolist()
    from herd.runtime.generate import GenerationStats, generate_tokens
    from herd.runtime.sampling import SamplingParams

    stats = GenerationStats()
    got = list(generate_tokens(llm.model, prompt, SamplingParams(temperature=0, max_tokens=20), (), 8192, stats))
    assert got == want
    assert stats.generated_tokens == 20 and stats.finish_reason == "length" and stats.prompt_tokens == len(prompt)
    # and the text API streams the same tokens' text (stop ids aside)
    text = llm.complete(prompt, temperature=0, max_tokens=20)
    stop = set(llm.tokenizer.stop_ids)
    upto = next((i for i, t in enumerate(want) if t in stop), len(want))
    assert text == llm.tokenizer.decode(want[:upto], skip_special=True)


def test_seeded_sampling_is_reproducible(tiny):
    _, llm = tiny
    a = llm.complete("Once", max_tokens=12, seed=3, temperature=1.0)
    b = llm.complete("Once", max_tokens=12, seed=3, temperature=1.0)
    assert a == b


def test_context_overflow(tiny):
    _, llm = tiny
    with pytest.raises(herd.ContextOverflowError, match="exceeds the context of 16 tokens"):
        llm.complete("one two three four five six", max_tokens=12, ctx=16)


def test_stats_and_max_tokens(tiny):
    _, llm = tiny
    llm.complete("Hi", max_tokens=5, temperature=0)
    s = llm.last_stats
    assert s.generated_tokens <= 5 and s.prompt_tokens == 2 and s.prefill_s > 0
    assert "tok/s" in s.line()


class _Tok:
    """A tokenizer whose tokens are single characters (to test the text stream exactly)."""

    def stream_decoder(self):
        class D:
            def push(self, i):
                return chr(i)

            def flush(self):
                return ""

        return D()


def test_stop_string_spanning_tokens_is_not_emitted():
    s = TextStream(_Tok(), ["END"])
    out = []
    for ch in "abcENxyEN":
        piece, stopped = s.push(ord(ch))
        out.append(piece)
        assert not stopped
    assert "".join(out) == "abcENxy"  # "EN" at the end is held back: it may start "END"
    piece, stopped = s.push(ord("D"))
    assert stopped and piece == ""
    assert "".join(out) + piece == "abcENxy"


def test_stop_strings_via_api(tiny):
    _, llm = tiny
    full = llm.complete("Hello", max_tokens=15, temperature=0)
    assert len(full) > 4
    stop = full[2:4]
    cut = llm.complete("Hello", max_tokens=15, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert llm.last_stats.finish_reason == "stop"


class _Scripted(torch.nn.Module):
    """Wraps a real model but emits a fixed token script (exact checks of stopping)."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.config, self.step = model, script, model.config, 0
        self.model = model.model

    def new_cache(self, batch=1):
        return self.inner.new_cache(batch)

    def forward(self, ids, cache=None, last_only=False, **kw):
        out = self.inner(ids, cache=cache, last_only=last_only, **kw)
        if ids.shape[1] > 1:
            self.step = 0
        forced = torch.full_like(out, -1e4)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 1e4
        self.step += 1
        return forced


def test_stop_token_gives_finish_reason_stop(tiny):
    _, llm = tiny
    tok = llm.tokenizer
    script = tok.encode(" hello there") + [tok.eot_id, 11, 12]
    scripted = herd.LLM(_Scripted(llm.model, script), tokenizer=tok)
    assert scripted.complete("Hi", max_tokens=10, temperature=0) == " hello there"
    assert scripted.last_stats.finish_reason == "stop"
    assert scripted.last_stats.generated_tokens == len(script) - 2  # the stop token counted, nothing after it


def test_inference_mode_does_not_leak_into_the_caller(tiny):
    _, llm = tiny
    stream = llm.generate("Hello", max_tokens=4, temperature=0)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    list(stream)

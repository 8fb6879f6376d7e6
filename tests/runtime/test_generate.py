"""Generation: greedy equals transformers' argmax chain; stop tokens and strings; max_tokens; context
errors; stats; the TextStream text side; the LLM methods built on them."""

from __future__ import annotations

import re

import pytest
import torch

from herd.errors import ContextOverflowError, RequestError
from herd.runtime.generate import GenerationStats, TextStream, generate_text, generate_tokens
from herd.runtime.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def prompt(real_vocab_llm):
    return real_vocab_llm.tokenizer.encode("The quick brown fox", bos=True)


@pytest.fixture(scope="module")
def hf_chain(real_vocab_checkpoint, prompt):
    """20 argmax steps of the transformers model: full forward each step, no cache, no stop."""
    hf, _ = real_vocab_checkpoint
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = hf(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy_tokens(llm, prompt, n=20, stop_ids=(), stats=None):
    return list(generate_tokens(llm.model, prompt, Sampler(GREEDY), n, stop_ids, stats))


def test_greedy_matches_transformers_argmax_chain(real_vocab_llm, prompt, hf_chain):
    stats = GenerationStats()
    assert greedy_tokens(real_vocab_llm, prompt, stats=stats) == hf_chain
    assert stats.finish_reason == "length" and stats.generated_tokens == 20


def test_greedy_text_is_the_decoded_chain(real_vocab_llm, prompt, hf_chain):
    tok = real_vocab_llm.tokenizer
    expected = hf_chain
    for i, t in enumerate(hf_chain):  # the generation ends at the first stop token
        if t in tok.stop_ids:
            expected = hf_chain[:i]
            break
    text = real_vocab_llm.complete(prompt, max_tokens=20, temperature=0)
    assert text == tok.decode(expected, skip_special=True)


def test_stop_token_ends_without_being_yielded(real_vocab_llm, prompt, hf_chain):
    stop = hf_chain[3]
    stats = GenerationStats()
    got = greedy_tokens(real_vocab_llm, prompt, stop_ids=[stop], stats=stats)
    assert got == hf_chain[: hf_chain.index(stop)]
    assert stats.finish_reason == "stop"


def test_stop_string_is_not_emitted(real_vocab_llm, prompt):
    llm = real_vocab_llm
    full = llm.complete(prompt, max_tokens=20, temperature=0)
    assert len(full) >= 8, full
    stop = full[4:7]
    pieces = list(llm.generate(prompt, max_tokens=20, temperature=0, stop=[stop, "never-there"]))
    assert "".join(pieces) == full[: full.index(stop)]
    assert llm.last_stats.finish_reason == "stop"
    assert llm.last_stats.generated_tokens < 20


def test_max_tokens_and_stats(real_vocab_llm, prompt):
    llm = real_vocab_llm
    pieces = llm.generate(prompt, max_tokens=5, temperature=0)
    stats = llm.last_stats
    list(pieces)
    assert stats is llm.last_stats
    assert stats.prompt_tokens == len(prompt)
    assert stats.generated_tokens == 5 and stats.finish_reason == "length"
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.prefill_tok_s == pytest.approx(len(prompt) / stats.prefill_s)
    assert stats.decode_tok_s == pytest.approx(5 / stats.decode_s)
    assert re.fullmatch(r"prompt \d+ tok, [\d.]+ tok/s \| generated 5 tok, [\d.]+ tok/s", stats.summary())


def test_context_overflow_raises_before_any_piece(real_vocab_llm, prompt):
    llm = real_vocab_llm
    with pytest.raises(ContextOverflowError) as err:
        llm.generate(prompt, max_tokens=8, ctx=len(prompt) + 7)  # raised by the call, not by iterating
    assert "\n" not in str(err.value) and str(len(prompt)) in str(err.value)
    assert llm.complete(prompt, max_tokens=7, temperature=0, ctx=len(prompt) + 7) is not None
    default = min(llm.config.max_position_embeddings, 8192)
    assert llm.context_size == default
    with pytest.raises(ContextOverflowError):
        llm.generate(prompt, max_tokens=default)


def test_bad_requests_raise_request_error(real_vocab_llm, prompt):
    llm = real_vocab_llm
    with pytest.raises(RequestError):
        llm.generate([], max_tokens=3)
    with pytest.raises(RequestError):
        llm.generate([llm.config.vocab_size], max_tokens=3)
    with pytest.raises(RequestError, match="top_p"):
        llm.generate(prompt, top_p=0)


def test_seed_reproduces_sampled_text(real_vocab_llm, prompt):
    llm = real_vocab_llm
    a = llm.complete(prompt, max_tokens=12, temperature=1.0, seed=7)
    b = llm.complete(prompt, max_tokens=12, temperature=1.0, seed=7)
    assert a == b


def test_inference_mode_does_not_leak_between_pieces(real_vocab_llm, prompt):
    it = real_vocab_llm.generate(prompt, max_tokens=4, temperature=0)
    next(it)
    assert not torch.is_inference_mode_enabled()
    it.close()


def test_str_prompt_gets_bos_and_equals_ids(real_vocab_llm):
    llm = real_vocab_llm
    ids = llm.tokenizer.encode("Hi there", bos=True)
    assert ids[0] == llm.tokenizer.bos_id
    assert llm.complete("Hi there", max_tokens=6, temperature=0) == llm.complete(ids, max_tokens=6, temperature=0)


def test_sampling_params_defaults_and_overrides(real_vocab_llm):
    llm = real_vocab_llm
    saved = llm.generation_defaults
    try:
        llm.generation_defaults = {}
        p = llm.sampling_params()
        assert (p.temperature, p.top_p, p.min_p) == (0.6, 0.9, 0.01)
        llm.generation_defaults = {"temperature": 0.3, "top_p": 0.5}
        p = llm.sampling_params(top_p=None, min_p=0.2, stop="x")
        assert (p.temperature, p.top_p, p.min_p, p.stop) == (0.3, 0.5, 0.2, ["x"])
        base = SamplingParams(temperature=0.0, max_tokens=3)
        assert llm.sampling_params(params=base, seed=1).max_tokens == 3
    finally:
        llm.generation_defaults = saved


def test_chat_methods(real_vocab_llm):
    llm = real_vocab_llm
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = llm.format_chat(messages)
    assert ids[0] == llm.tokenizer.bos_id and ids.count(llm.tokenizer.bos_id) == 1
    reply = llm.chat(messages, max_tokens=6, temperature=0)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    assert "".join(llm.chat_stream(messages, max_tokens=6, temperature=0)) == llm.complete(ids, max_tokens=6, temperature=0)


def test_generate_text_function(real_vocab_llm, prompt):
    stats = GenerationStats()
    pieces = generate_text(real_vocab_llm.model, real_vocab_llm.tokenizer, prompt, SamplingParams(temperature=0, max_tokens=3), None, stats)
    "".join(pieces)
    assert stats.generated_tokens <= 3 and stats.finish_reason in ("stop", "length")


# ---------------------------------------------------------------- TextStream, with a toy tokenizer
class _ToyDecoder:
    def __init__(self, table):
        self.table = table

    def push(self, i):
        return self.table[i]

    def flush(self):
        return ""


class _ToyTokenizer:
    def __init__(self, pieces):
        self.table = dict(enumerate(pieces))

    def stream_decoder(self):
        return _ToyDecoder(self.table)


def run_stream(pieces, stops):
    s = TextStream(_ToyTokenizer(pieces), stops)
    out = []
    for i in range(len(pieces)):
        text, stopped = s.push(i)
        out.append(text)
        if stopped:
            return out, True, s
    out.append(s.flush())
    return out, False, s


def test_text_stream_without_stops_passes_everything():
    out, stopped, _ = run_stream(["Hel", "lo", " world"], [])
    assert out == ["Hel", "lo", " world", ""] and not stopped


def test_text_stream_stop_spanning_tokens():
    out, stopped, s = run_stream(["Hello", " wo", "rld", " again"], ["o world"])
    assert stopped and "".join(out) == "Hell"
    assert s.push(3) == ("", True) and s.flush() == ""


def test_text_stream_holds_back_a_possible_stop_then_releases():
    # "wo" could start "world!" -> held; "rm" proves it is not -> released
    out, stopped, _ = run_stream(["say wo", "rm", "s"], ["world!"])
    assert not stopped
    assert out == ["say ", "worm", "s", ""]


def test_text_stream_flush_releases_held_text():
    out, stopped, _ = run_stream(["a", "b", "<"], ["<end>"])
    assert out == ["a", "b", "", "<"] and not stopped


def test_text_stream_earliest_stop_wins():
    out, stopped, _ = run_stream(["x STOP2 y STOP1"], ["STOP1", "STOP2"])
    assert stopped and out == ["x "]


def test_text_stream_with_the_real_decoder_splits_no_character(real_vocab_llm):
    tok = real_vocab_llm.tokenizer
    text = "naïve café 🦙 llama"
    ids = tok.encode(text)
    s = TextStream(tok, ["llama"])
    out = []
    for i in ids:
        piece, stopped = s.push(i)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "naïve café 🦙 "
    assert all("\ufffd" not in p for p in out)

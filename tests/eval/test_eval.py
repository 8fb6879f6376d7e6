"""Perplexity and KL divergence against transformers' computation on the same tiny random checkpoint and chunks;
chunking as llama-perplexity does it; the CLI front ends."""

import json
import math

import pytest
import torch

import herd
from herd.cli.main import main
from herd.eval import base_run, chunk_tokens, compare, kld_stats, perplexity, text_chunks

CTX = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(transformers model, its saved directory with a byte-level tokenizer)."""
    from builders import byte_bpe_tokenizer_json, random_hf_model, tiny_text_config

    hf = random_hf_model(tiny_text_config(vocab_size=512, bos_token_id=270, eos_token_id=[271]), seed=5)
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    hf.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(byte_bpe_tokenizer_json(512)), encoding="utf-8")
    return hf, path


def _chunks():
    g = torch.Generator().manual_seed(2)
    return [[270] + torch.randint(0, 256, (CTX - 1,), generator=g).tolist() for _ in range(3)]


def _hf_scored_logprobs(hf, chunks):
    """log-softmax of transformers' logits at positions ctx//2 .. ctx-2 of each chunk (float64)."""
    with torch.no_grad():
        return [torch.log_softmax(hf(torch.tensor([c])).logits[0].double(), -1)[len(c) // 2:-1] for c in chunks]


def test_perplexity_equals_transformers(model):
    hf, path = model
    chunks = _chunks()
    nll, n = 0.0, 0
    for c, logp in zip(chunks, _hf_scored_logprobs(hf, chunks)):
        targets = c[len(c) // 2 + 1:]  # llama-perplexity scores the second half of each chunk
        nll -= sum(float(logp[i, t]) for i, t in enumerate(targets))
        n += len(targets)
    got = perplexity(herd.load(path), chunks, progress=False)
    assert got["tokens"] == n == 3 * (CTX - 1 - CTX // 2)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5)


def test_kld_against_itself_is_zero(model):
    _, path = model
    llm = herd.load(path)
    same = kld_stats(llm, llm, _chunks(), progress=False)
    assert same["kld_mean"] == 0.0 and same["kld_max"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["ppl"] == same["base_ppl"] and same["tokens"] == 3 * (CTX - 1 - CTX // 2)


def test_kld_of_a_perturbed_copy_matches_torch(model):
    hf, path = model
    chunks = _chunks()
    llm = herd.load(path)
    base = base_run(llm, chunks, progress=False)  # computed once, reused for every model compared
    orig = _hf_scored_logprobs(hf, chunks)
    saved = hf.lm_head.weight.detach().clone()
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        w = llm.model.lm_head.weight
        w.add_(0.05 * torch.randn(w.shape, generator=g))
        hf.lm_head.weight.copy_(w)  # the same perturbation, evaluated independently by transformers
    try:
        got = compare(llm, base, progress=False)
        ref = _hf_scored_logprobs(hf, chunks)
    finally:
        with torch.no_grad():
            hf.lm_head.weight.copy_(saved)
    kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(orig, ref)])
    top1 = sum(int((p.argmax(-1) == q.argmax(-1)).sum()) for p, q in zip(orig, ref)) / kl.numel()
    nll = -sum(float(q[range(len(c) - 1 - len(c) // 2), c[len(c) // 2 + 1:]].sum()) for c, q in zip(chunks, ref))
    assert got["kld_mean"] == pytest.approx(float(kl.mean()), rel=1e-4) and got["kld_mean"] > 1e-4
    assert got["kld_median"] == pytest.approx(float(kl.median()), rel=1e-4)
    assert got["kld_p99"] == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-4)
    assert got["top1_agreement"] == top1
    assert got["ppl"] == pytest.approx(math.exp(nll / kl.numel()), rel=1e-5)
    assert got["base_ppl"] == pytest.approx(base.ppl)


def test_chunks_follow_llama_perplexity():
    """llama.cpp tokenizes with BOS first, cuts windows of ctx tokens, and puts BOS first in each window."""
    ids = [0] + list(range(5, 55))  # BOS + 50 tokens
    chunks = chunk_tokens(ids, 16, bos=0)
    assert len(chunks) == 3 and all(c[0] == 0 and len(c) == 16 for c in chunks)
    assert chunks[0][1:] == list(range(5, 20)) and chunks[1][1:] == list(range(5 + 16, 5 + 31))
    assert chunk_tokens(ids, 16, bos=0, max_chunks=2) == chunks[:2]
    with pytest.raises(herd.HerdError, match="-c 2"):
        chunk_tokens(ids, 2, bos=0)


def test_text_chunks_tokenize_with_bos(model):
    _, path = model
    llm = herd.load(path)
    text = "the river runs by the old mill " * 4
    ids = llm.tokenizer.encode(text, bos=True)
    assert ids[0] == 270
    chunks = text_chunks(llm, text, ctx=16)
    assert len(chunks) == len(ids) // 16 and chunks[1] == [270] + ids[17:32]
    with pytest.raises(herd.HerdError, match="fewer than one chunk of -c 512"):
        text_chunks(llm, text, ctx=512)


def test_cli_perplexity_and_kld(model, tmp_path, capsys):
    _, path = model
    text = tmp_path / "t.txt"
    text.write_text("the river runs by the old mill and the miller sings of rain. " * 6, encoding="utf-8")
    assert main(["perplexity", "-m", str(path), "-f", str(text), "-c", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    llm = herd.load(path)
    want = perplexity(llm, text_chunks(llm, text.read_text(), 32), progress=False)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6) and got["tokens"] == want["tokens"]
    assert main(["kld", "--base", str(path), "-m", str(path), "-f", str(text), "-c", "32", "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kld_mean"] == 0.0 and r["top1_agreement"] == 1.0 and r["tokens"] == 2 * 15


def test_cli_errors(tmp_path, capsys):
    assert main(["perplexity", "-m", "demo", "-f", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: no such text file" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    assert main(["kld", "--base", "demo", "-m", "demo", "-f", str(bad)]) == 1
    assert "bad.txt: cannot read the text file as UTF-8" in capsys.readouterr().err

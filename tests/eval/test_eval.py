"""Perplexity and KL divergence against transformers' computation on the same checkpoint and chunks."""

import math

import pytest
import torch

import herd
from herd.cli.main import main
from herd.eval import base_run, compare, perplexity, text_chunks


@pytest.fixture(scope="module")
def model(hf_checkpoint_module):
    return hf_checkpoint_module


@pytest.fixture(scope="module")
def hf_checkpoint_module(tmp_path_factory):
    from builders import random_hf_model, tiny_text_config

    hf = random_hf_model(tiny_text_config(), seed=5)
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    hf.save_pretrained(path)
    return hf, path


def _chunks():
    torch.manual_seed(2)
    return [[0] + torch.randint(2, 384, (23,)).tolist() for _ in range(3)]


def test_perplexity_equals_transformers(model):
    hf, path = model
    chunks = _chunks()
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            logp = torch.log_softmax(hf(torch.tensor([c])).logits[0].double(), -1)
            first = len(c) // 2  # llama-perplexity scores the second half of each chunk
            for i in range(first, len(c) - 1):
                nll -= float(logp[i, c[i + 1]])
                n += 1
    got = perplexity(herd.load(path), chunks, progress=False)
    assert got["tokens"] == n == 3 * 11
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_kld_of_a_model_with_itself_is_zero_and_perturbed_matches_torch(model):
    hf, path = model
    chunks = _chunks()
    llm = herd.load(path)
    base = base_run(llm, chunks, progress=False)
    same = compare(llm, base, progress=False)
    assert same["kld_mean"] < 1e-9 and same["top1_agreement"] == 1.0 and same["ppl"] == pytest.approx(same["base_ppl"])
    with torch.no_grad():
        llm.model.lm_head.weight.add_(0.05 * torch.randn_like(llm.model.lm_head.weight))
    got = compare(llm, base, progress=False)
    with torch.no_grad():
        ref = [torch.log_softmax(hf(torch.tensor([c])).logits[0, 12:-1].double(), -1) for c in chunks]
        new = [torch.log_softmax(llm.logits(torch.tensor([c]))[0, 12:-1].double(), -1) for c in chunks]
    kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(ref, new)])
    assert got["kld_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert got["kld_p99"] == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-4)


def test_text_chunks_follow_llama_cpp(model):
    _, path = model
    llm = herd.load(path)

    class Tok:
        bos_id = 0

        @staticmethod
        def encode(text, bos=False):
            return list(range(5, 5 + len(text)))

    llm._tokenizer = Tok()
    chunks = text_chunks(llm, "x" * 50, ctx=16)
    assert len(chunks) == 3 and all(c[0] == 0 and len(c) == 16 for c in chunks)
    assert chunks[1][1:] == list(range(5 + 17, 5 + 32))
    with pytest.raises(herd.HerdError, match="fewer than one chunk"):
        text_chunks(llm, "x" * 10, ctx=16)


def test_cli_errors(tmp_path, capsys):
    assert main(["perplexity", "-m", "demo", "-f", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: no such text file" in capsys.readouterr().err

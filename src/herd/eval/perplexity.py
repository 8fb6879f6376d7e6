"""Perplexity over a text, with llama-perplexity's conventions, so numbers compare with llama.cpp's.

* The whole text is tokenized once with BOS first (llama.cpp tokenizes with ``add_special``), and the token
  stream is cut into consecutive, non-overlapping chunks of ``ctx`` tokens; a partial last chunk is dropped.
* The first token of every chunk is replaced by BOS, and each chunk is evaluated on its own (no cache carried
  over between chunks).
* Only the second half of each chunk is scored: the logits at positions ``ctx//2 … ctx-2`` predict tokens
  ``ctx//2+1 … ctx-1``, so every scored token has at least ctx/2 tokens of context. A chunk contributes
  ``ctx - 1 - ctx//2`` tokens.
* PPL = exp(mean negative log-likelihood over all scored tokens).

llama-imatrix chunks and scores its running perplexity the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import HerdError


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HerdError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HerdError(f"{path}: cannot read the text file as UTF-8 ({exc.__class__.__name__})") from None


def chunk_tokens(ids: list[int], ctx: int, bos: int | None, max_chunks: int | None = None) -> list[list[int]]:
    """Consecutive windows of `ctx` tokens of `ids`, the first token of each replaced by `bos` (when given)."""
    if ctx < 3:
        raise HerdError(f"-c {ctx}: a chunk must hold at least 3 tokens (its second half is scored)")
    n = len(ids) // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise HerdError(f"--chunks {max_chunks}: expected at least 1")
        n = min(n, max_chunks)
    chunks = []
    for i in range(n):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def text_chunks(llm, text: str, ctx: int = 512, max_chunks: int | None = None) -> list[list[int]]:
    """Token chunks of `text` for the model's tokenizer (see the module docstring)."""
    ids = llm.tokenizer.encode(text, bos=True)
    chunks = chunk_tokens(ids, ctx, llm.tokenizer.bos_id, max_chunks)
    if not chunks:
        raise HerdError(f"the text has {len(ids)} tokens: fewer than one chunk of -c {ctx}")
    return chunks


def first_scored(ctx: int) -> int:
    """Index of the first position whose logits are scored in a chunk of `ctx` tokens."""
    return ctx // 2


def scored_logprobs(llm, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n, vocab] float32 at the scored positions, the tokens they predict [n]), on the CPU.
    Quantized weights decode exactly here (no int8 kernel rounding): scores measure the format."""
    from ..quant import kernels

    ids = torch.tensor([chunk], dtype=torch.long, device=llm.device)
    with torch.inference_mode(), kernels.exact():
        logits = llm.model(ids)[0]
        first = first_scored(len(chunk))
        logp = torch.log_softmax(logits[first:-1].float(), dim=-1)
    return logp.cpu(), ids[0, first + 1:].cpu()


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token, float64 [n]."""
    return -logprobs.gather(1, targets[:, None])[:, 0].double()


def perplexity(llm, chunks: list[list[int]], progress: bool = True) -> dict:
    """{"ppl", "nll" (mean nats per scored token), "tokens" (scored)} over `chunks`, with a running-PPL bar."""
    from tqdm import tqdm

    if not chunks:
        raise HerdError("perplexity: no chunks to score")
    nll, n = 0.0, 0
    bar = tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress)
    for chunk in bar:
        logp, target = scored_logprobs(llm, chunk)
        nll += float(token_nll(logp, target).sum())
        n += len(target)
        bar.set_postfix(ppl=f"{math.exp(nll / n):.3f}")
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


__all__ = ["read_text", "chunk_tokens", "text_chunks", "first_scored", "scored_logprobs", "token_nll", "perplexity"]

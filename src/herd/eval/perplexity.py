"""Perplexity over a text, with llama-perplexity's conventions.

The text is tokenized once (no BOS), cut into consecutive chunks of ``ctx`` tokens whose first token is
replaced by BOS, and each chunk is evaluated on its own; only the second half of each chunk is scored (every
scored token then has at least ctx/2 tokens of context), so numbers are comparable with llama.cpp's.
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


def text_chunks(llm, text: str, ctx: int = 512, max_chunks: int | None = None) -> list[list[int]]:
    """Token chunks of `text` for the model's tokenizer (see the module docstring)."""
    from ..quant.imatrix import chunk_tokens

    ids = llm.tokenizer.encode(text, bos=False)
    chunks = chunk_tokens(ids, ctx, llm.tokenizer.bos_id, max_chunks)
    if not chunks:
        raise HerdError(f"the text has {len(ids)} tokens: fewer than one chunk of -c {ctx}")
    return chunks


def scored_logprobs(llm, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n, vocab] at the scored positions, the tokens that follow them [n])."""
    ids = torch.tensor([chunk], dtype=torch.long)
    with torch.inference_mode():
        logits = llm.model(ids)[0].float()
    first = len(chunk) // 2
    return torch.log_softmax(logits[first:-1], dim=-1), ids[0, first + 1:]


def perplexity(llm, chunks: list[list[int]], progress: bool = True) -> dict:
    """{"ppl", "nll" (mean nats/token), "tokens" (scored)} over the chunks, with a running-ppl bar."""
    from tqdm import tqdm

    nll, n = 0.0, 0
    bar = tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress)
    for chunk in bar:
        logp, target = scored_logprobs(llm, chunk)
        nll -= float(logp.gather(1, target[:, None]).sum())
        n += len(target)
        bar.set_postfix(ppl=f"{math.exp(nll / n):.3f}")
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}

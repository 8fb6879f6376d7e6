"""KL divergence of a (quantized) model's next-token distributions from a base model's, as llama-perplexity's
``--kl-divergence`` reports it: mean, median and 99th percentile of KL(base || model) per scored token, and
how often both pick the same top token. The base run is kept in memory so many models can be compared with
one base pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .perplexity import scored_logprobs


@dataclass
class BaseRun:
    chunks: list[list[int]]
    logprobs: list[torch.Tensor]  # per chunk [n, vocab]
    targets: list[torch.Tensor]

    @property
    def nll(self) -> float:
        total = sum(float(-lp.gather(1, t[:, None]).sum()) for lp, t in zip(self.logprobs, self.targets))
        return total / sum(len(t) for t in self.targets)


def base_run(llm, chunks: list[list[int]], progress: bool = True) -> BaseRun:
    from tqdm import tqdm

    lps, tgts = [], []
    for chunk in tqdm(chunks, desc="base", unit="chunk", disable=not progress):
        lp, t = scored_logprobs(llm, chunk)
        lps.append(lp)
        tgts.append(t)
    return BaseRun(chunks, lps, tgts)


def compare(llm, base: BaseRun, progress: bool = True) -> dict:
    """KL statistics of `llm` against `base` on the same chunks, plus both perplexities."""
    from tqdm import tqdm

    klds, same, nll, n = [], 0, 0.0, 0
    for chunk, base_lp, target in tqdm(list(zip(base.chunks, base.logprobs, base.targets)), desc="kld",
                                       unit="chunk", disable=not progress):
        lp, _ = scored_logprobs(llm, chunk)
        klds.append((base_lp.exp() * (base_lp - lp)).sum(-1).clamp_min(0.0))
        same += int((base_lp.argmax(-1) == lp.argmax(-1)).sum())
        nll -= float(lp.gather(1, target[:, None]).sum())
        n += len(target)
    kld = torch.cat(klds).double()
    return {
        "kld_mean": float(kld.mean()),
        "kld_median": float(kld.median()),
        "kld_p99": float(torch.quantile(kld, 0.99)),
        "top1_agreement": same / n,
        "ppl": math.exp(nll / n),
        "base_ppl": math.exp(base.nll),
        "tokens": n,
    }

"""`herd kld`: KL divergence of a model's next-token distributions from a base model's on a text file, as
llama-perplexity --kl-divergence reports it (mean, median, 99th percentile, top-1 agreement, both PPLs).

    herd kld --base BASE -m QUANT -f text.txt [-c CTX] [--chunks N] [--json]
"""

from __future__ import annotations

import argparse
import json

from .perplexity import add_eval_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kld", help="KL divergence of a (quantized) model from a base model on a text")
    p.add_argument("--base", required=True, help="reference model (directory, .gguf or hub id)")
    p.add_argument("-m", "--model", required=True, help="model to compare (e.g. a quantized .gguf)")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import herd
    from herd.errors import HerdError
    from herd.eval import base_run, compare, read_text, text_chunks

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.file)
    base_llm = herd.load(args.base, dtype="f32")
    base = base_run(base_llm, text_chunks(base_llm, text, args.ctx_size, args.chunks))
    base_vocab = base_llm.config.vocab_size
    del base_llm  # one model in memory at a time: the base pass keeps only its log-probs
    llm = herd.load(args.model, dtype="f32")
    if llm.config.vocab_size != base_vocab:
        raise HerdError(f"{args.model}: vocabulary of {llm.config.vocab_size} tokens, the base has {base_vocab}")
    r = compare(llm, base)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"mean KLD {r['kld_mean']:.6f}  median {r['kld_median']:.6f}  p99 {r['kld_p99']:.6f}  "
              f"max {r['kld_max']:.6f}  top-1 agreement {r['top1_agreement']:.4f}  "
              f"PPL {r['ppl']:.4f} (base {r['base_ppl']:.4f})  {r['tokens']} tokens")
    return 0

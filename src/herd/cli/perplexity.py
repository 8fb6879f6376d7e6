"""`herd perplexity`: perplexity of a model on a text file, with llama-perplexity's chunking and scoring
(chunks of -c tokens, BOS first, the second half of each chunk scored; see herd.eval.perplexity).

    herd perplexity -m MODEL -f text.txt [-c CTX] [--chunks N] [--json]
"""

from __future__ import annotations

import argparse
import json


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with `herd kld`."""
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (llama-perplexity's method)")
    p.add_argument("-m", "--model", default="demo", help="model directory, .gguf or hub id (default: the demo)")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import herd
    from herd.eval import perplexity, read_text, text_chunks

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.file)
    llm = herd.load(args.model, dtype="f32")
    result = perplexity(llm, text_chunks(llm, text, args.ctx_size, args.chunks))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.4f} over {result['tokens']} scored tokens (-c {args.ctx_size})")
    return 0

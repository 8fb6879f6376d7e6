"""`herd run`: one prompt in, the answer streamed to stdout, a timing line on stderr.

Like llama-cli's conversation mode (its default), the prompt is sent as one user turn in the Llama 4
chat format, after the ``-sys`` system prompt if given. ``-no-cnv`` continues the raw text instead
(BOS + the prompt, no template) and prints the prompt before the continuation. ``-n -1`` generates until
a stop token or the end of the context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_args, add_sampling_args, load_model, sampling_params, show_prompt


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from one prompt")
    add_model_args(p)
    add_sampling_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="the prompt")
    source.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("-no-cnv", "--no-conversation", dest="no_cnv", action="store_true",
                   help="raw completion: no chat template")
    p.set_defaults(func=run)


def request_for(llm, args: argparse.Namespace, n_prompt: int):
    """(SamplingParams, ctx) from the flags; a negative -n means "what the context leaves"."""
    ctx = args.ctx_size or llm.context_size
    n = args.n_predict
    if n is not None and n < 0:
        n = max(ctx - n_prompt, 1)  # >= 1: a prompt that fills the context still gets the overflow error
    return sampling_params(llm, argparse.Namespace(**{**vars(args), "n_predict": n})), ctx


def stream(pieces) -> list[str]:
    """Write pieces to stdout as they come; returns them. Ctrl-C propagates to the caller."""
    said: list[str] = []
    try:
        for piece in pieces:
            said.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        pieces.close()
    return said


def timing_line(llm) -> None:
    if llm.last_stats is not None:
        print(llm.last_stats.summary(), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError

    if args.file is not None:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HerdError(f"{args.file}: cannot read the prompt ({exc.__class__.__name__})") from None
    else:
        prompt = args.prompt
    llm = load_model(args)
    if args.no_cnv:
        ids = llm.tokenizer.encode(prompt, bos=True)
    else:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        ids = llm.format_chat([*messages, {"role": "user", "content": prompt}])
    if args.verbose_prompt:
        show_prompt(llm, ids)
    params, ctx = request_for(llm, args, len(ids))
    pieces = llm.generate(ids, params=params, ctx=ctx)  # a bad request raises here, before any output
    if args.no_cnv:
        sys.stdout.write(prompt)
    try:
        stream(pieces)
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
        timing_line(llm)
    return 0

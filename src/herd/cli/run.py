"""`herd run`: generate from one prompt (as a chat turn, or raw with -no-cnv), streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_args, add_sampling_args, load_model, sampling_params, show_prompt, stream_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from a prompt")
    add_model_args(p)
    add_sampling_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-no-cnv", "--no-conversation", dest="no_cnv", action="store_true",
                   help="raw completion of the prompt, no chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError

    if args.file:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HerdError(f"{args.file}: cannot read the prompt file ({type(exc).__name__})") from None
    else:
        prompt = args.prompt
    llm = load_model(args)
    params = sampling_params(llm, args)
    if args.no_cnv:
        ids = llm.tokenizer.encode(prompt, bos=True)
    else:
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = llm.format_chat(messages)
    if args.verbose_prompt:
        show_prompt(llm, ids)
    if args.no_cnv:
        sys.stdout.write(prompt)
    stream_out(llm.generate(ids, params=params, ctx=args.ctx_size))
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(llm.last_stats.line(), file=sys.stderr)
    return 0

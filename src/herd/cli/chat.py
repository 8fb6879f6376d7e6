"""`herd chat`: an interactive conversation. /reset clears the history, /exit (or EOF) quits,
Ctrl-C stops the current answer and keeps the session."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_params, show_prompt


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    llm = load_model(args)
    params = sampling_params(llm, args)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("herd chat: /reset clears the conversation, /exit quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            continue
        if not line:
            return 0  # EOF
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = llm.format_chat(history)
        if args.verbose_prompt:
            show_prompt(llm, ids)
        pieces = []
        try:
            for piece in llm.generate(ids, params=params, ctx=args.ctx_size):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        if llm.last_stats is not None:
            print(llm.last_stats.line(), file=sys.stderr)

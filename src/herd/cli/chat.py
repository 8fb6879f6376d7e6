"""`herd chat`: talk to a model in the terminal, in the Llama 4 chat format.

Every input line is a user turn; the answer streams to stdout, a timing line to stderr. ``/reset``
clears the history (the ``-sys`` system prompt stays), ``/exit`` or EOF (Ctrl-D) ends with status 0.
Ctrl-C while an answer streams stops that answer (the part already shown stays in the history) and the
session goes on. A turn that no longer fits the context is refused with one line; the session goes on.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model, show_prompt
from .run import request_for, stream, timing_line

HELP = "herd chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def answer(llm, args: argparse.Namespace, history: list[dict]) -> str | None:
    """Stream the assistant's answer to `history`; None if the turn does not fit the context."""
    from herd.errors import ContextOverflowError

    ids = llm.format_chat(history)
    if args.verbose_prompt:
        show_prompt(llm, ids)
    params, ctx = request_for(llm, args, len(ids))
    try:
        pieces = llm.generate(ids, params=params, ctx=ctx)
    except ContextOverflowError as exc:
        print(f"herd: error: {exc} (/reset starts over)", file=sys.stderr, flush=True)
        return None
    said: list[str] = []
    try:
        stream(_Collect(pieces, said))
    except KeyboardInterrupt:
        print(" [stopped]", file=sys.stderr, flush=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
    timing_line(llm)
    return "".join(said)


class _Collect:
    """Wraps a piece iterator, keeping every piece in `into` (so an interrupted answer is not lost)."""

    def __init__(self, pieces, into: list[str]):
        self.pieces, self.into = pieces, into

    def __iter__(self):
        for piece in self.pieces:
            self.into.append(piece)
            yield piece

    def close(self):
        self.pieces.close()


def run(args: argparse.Namespace) -> int:
    llm = load_model(args)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history = list(system)
    tty = sys.stdin.isatty()
    if tty:
        print(HELP, file=sys.stderr, flush=True)
    while True:
        if tty:
            sys.stdout.write("> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr, flush=True)
            continue
        if not line:
            return 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            history = list(system)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = answer(llm, args, history)
        except KeyboardInterrupt:
            print(" [stopped]", file=sys.stderr, flush=True)
            reply = None
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})

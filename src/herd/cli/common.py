"""Flags shared by the commands that load a model and sample from it (llama.cpp spellings)."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="model directory, .gguf file or hub id (default: the bundled demo)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default=None, help="f32 | bf16 | f16 (default: as stored)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context window in tokens (default: min(model, 8192))")
    p.add_argument("--compile", action="store_true",
                   help="decode through one compiled graph per step (faster; compiles on the first step; HERD_COMPILE=1)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=None, help="temperature (default 0.6; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("-sys", "--system-prompt", default=None)
    p.add_argument("--verbose-prompt", action="store_true", help="print the prompt's token ids and pieces to stderr")


def load_model(args: argparse.Namespace):
    import torch

    import herd

    if args.threads:
        torch.set_num_threads(args.threads)
    return compile_if_asked(herd.load(args.model or "demo", dtype=args.dtype), getattr(args, "compile", False))


def compile_if_asked(llm, flag: bool):
    """Attach the compiled decode step when `flag` (``--compile``) or ``HERD_COMPILE`` asks for it."""
    from herd.runtime import compiled

    if flag or compiled.wanted():
        llm.compile()
        print("herd: the first decode step compiles the step graph (seconds; inductor caches it on disk)", file=sys.stderr)
    return llm


def sampling_params(llm, args: argparse.Namespace):
    return llm.sampling_params(
        max_tokens=args.n_predict,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        repetition_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def show_prompt(llm, ids: list[int]) -> None:
    print(f"prompt: {len(ids)} tokens", file=sys.stderr)
    for i in ids:
        print(f"{i:>8} -> {llm.tokenizer.id_to_piece(i)!r}", file=sys.stderr)


def stream_out(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()

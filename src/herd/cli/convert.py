"""`herd convert`: a Hugging Face checkpoint -> a llama4 GGUF that llama.cpp loads."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF")
    p.add_argument("-m", "--model", required=True, help="HF checkpoint directory (or hub id)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError
    from herd.weights import hub
    from herd.weights.gguf_write import convert_hf

    kind, path = hub.resolve(args.model)
    if kind != "hf":
        raise HerdError(f"{args.model}: convert reads a Hugging Face checkpoint directory, not a GGUF")
    written = convert_hf(path, args.output, args.outtype)
    for f in written:
        print(f"wrote {f} ({f.stat().st_size:,} bytes)", file=sys.stderr)
    return 0

"""`herd convert`: a Hugging Face Llama 4 checkpoint -> a llama4 GGUF that llama.cpp loads.

Same keys, tensor names, layouts and type rules as llama.cpp's convert_hf_to_gguf.py (plus herd's own
``herd.*`` keys for the constants llama.cpp hard-codes), written tensor by tensor to ``OUT.tmp`` and renamed
into place when complete.
"""

from __future__ import annotations

import argparse
import re
import sys


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500M or 4G")
    return int(float(m[1]) * 1024 ** "KMGT".find(m[2].upper()) * 1024) if m[2] else int(float(m[1]))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF (llama.cpp's llama4 layout)")
    p.add_argument("-m", "--model", required=True, help="HF checkpoint directory (or hub id)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the matrices (norms, the router and 1-D tensors stay F32); default f32")
    p.add_argument("--split-max-tensors", type=int, default=0, metavar="N",
                   help="write parts of at most N tensors (name-00001-of-0000n.gguf), as gguf-split")
    p.add_argument("--split-max-size", type=_size, default=0, metavar="SIZE",
                   help="write parts of at most SIZE bytes of tensor data (e.g. 4G)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError
    from herd.weights import hub
    from herd.weights.gguf_write import convert_hf

    kind, path = hub.resolve(args.model)
    if kind != "hf":
        raise HerdError(f"{args.model}: convert reads a Hugging Face checkpoint directory, not a GGUF")
    written = convert_hf(path, args.output, args.outtype, split_max_tensors=args.split_max_tensors,
                         split_max_size=args.split_max_size)
    for f in written:
        print(f"wrote {f} ({f.stat().st_size:,} bytes)", file=sys.stderr)
    return 0

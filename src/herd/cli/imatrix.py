"""`herd imatrix`: an importance matrix from calibration text, in llama.cpp's imatrix format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's GGUF or .dat format)")
    p.add_argument("-m", "--model", default="demo", help="model directory, .gguf or hub id (default: the demo)")
    p.add_argument("-f", "--file", required=True, help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output file; .dat writes the legacy format")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import herd
    from herd.eval import read_text, text_chunks
    from herd.quant.imatrix import collect_imatrix

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.file)
    llm = herd.load(args.model, dtype="f32")
    chunks = text_chunks(llm, text, args.ctx_size, args.chunks)
    im = collect_imatrix(llm, chunks, dataset=Path(args.file).name)
    out = im.save(args.output)
    print(f"wrote {out}: {len(im.entries)} entries from {len(chunks)} chunks of {args.ctx_size} tokens",
          file=sys.stderr)
    return 0

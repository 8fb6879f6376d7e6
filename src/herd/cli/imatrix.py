"""`herd imatrix`: an importance matrix from calibration text, in llama-imatrix's file formats.

    herd imatrix -m MODEL -f calib.txt -o imatrix.gguf [--chunks N] [-c CTX] [--output-format gguf|dat]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's GGUF or .dat format)")
    p.add_argument("-m", "--model", default="demo", help="model directory, .gguf or hub id (default: the demo)")
    p.add_argument("-f", "--file", required=True, help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default imatrix.gguf)")
    p.add_argument("--output-format", choices=["gguf", "dat"], default=None,
                   help="file format (default: dat if the output name ends in .dat, else gguf)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks")
    p.add_argument("--process-output", action="store_true", help="also collect the output head (output.weight)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import herd
    from herd.errors import HerdError
    from herd.eval import read_text, text_chunks
    from herd.quant.imatrix import collect_imatrix

    out = Path(args.output)
    fmt = args.output_format or ("dat" if out.suffix == ".dat" else "gguf")
    if (fmt == "dat") != (out.suffix == ".dat"):
        raise HerdError(f"{out}: --output-format {fmt} needs a name ending in {'.dat' if fmt == 'dat' else '.gguf'}")
    if not out.parent.is_dir():
        raise HerdError(f"{out}: the output directory {out.parent} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.file)
    llm = herd.load(args.model, dtype="f32")  # activations in f32, as llama-imatrix collects them
    chunks = text_chunks(llm, text, args.ctx_size, args.chunks)
    im = collect_imatrix(llm, chunks, dataset=args.file, process_output=args.process_output)
    im.save(out)
    print(f"wrote {out}: {len(im.entries)} entries from {len(chunks)} chunks of {args.ctx_size} tokens",
          file=sys.stderr)
    return 0

"""`herd quant-report`: quantize a model with every preset (with and without an imatrix), size-matched auto
allocations and one class at a time; write a table and a KLD-vs-bpw plot (docs/quant-report.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant-report", help="measure every quantization preset against the base model")
    p.add_argument("-m", "--model", default="demo", help="base model (default: the bundled demo)")
    p.add_argument("-f", "--file", required=True, help="held-out evaluation text")
    p.add_argument("--calib", required=True, help="calibration text for the imatrix and the sensitivity trials")
    p.add_argument("-o", "--output", default="docs/quant-report.md", help="markdown report (a .png and .json beside it)")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16, help="evaluation chunks (default 16)")
    p.add_argument("--calib-chunks", type=int, default=32, help="imatrix chunks (default 32)")
    p.add_argument("--sens-chunks", type=int, default=8, help="chunks per sensitivity trial (default 8)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from herd.eval import read_text
    from herd.quant.report import run_report

    if args.threads:
        torch.set_num_threads(args.threads)
    eval_text, calib_text = read_text(args.file), read_text(args.calib)
    rows = run_report(args.model, eval_text, calib_text, Path(args.output), ctx=args.ctx_size, eval_chunks=args.chunks,
                      calib_chunks=args.calib_chunks, sens_chunks=args.sens_chunks)
    print(f"wrote {args.output} ({len(rows)} models)", file=sys.stderr)
    return 0

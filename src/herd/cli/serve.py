"""`herd serve`: the OpenAI-compatible HTTP API (FastAPI + uvicorn), loopback by default."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    p.add_argument("-m", "--model", default=None, help="model directory, .gguf file or hub id (default: the bundled demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context window in tokens (default: min(model, 8192))")
    p.add_argument("--parallel", "-np", type=int, default=4, help="requests decoded together (more wait in a queue)")
    p.add_argument("--alias", default=None, help="model name reported by /v1/models")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", action="store_true",
                   help="one-row decode steps through one compiled graph (faster; compiles on the first; HERD_COMPILE=1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    import herd
    from herd.errors import HerdError
    from herd.serve.app import create_app

    if args.parallel < 1:
        raise HerdError("--parallel must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .common import compile_if_asked

    llm = compile_if_asked(herd.load(args.model or "demo", dtype=args.dtype), args.compile)
    name = args.alias or (args.model or "demo")
    app = create_app(llm, model_name=name, api_key=args.api_key, parallel=args.parallel, ctx=args.ctx_size)
    print(f"herd: serving {name} on http://{args.host}:{args.port}/v1 (parallel {args.parallel})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

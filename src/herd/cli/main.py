"""`herd` command line: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``.

User mistakes (HerdError) print one line and exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under herd.cli (imported lazily so `herd info` stays fast)
SUBCOMMANDS = {
    "info": "info",
    "run": "run",
    "chat": "chat",
    "convert": "convert",
    "serve": "serve",
    "quantize": "quantize",
    "imatrix": "imatrix",
    "perplexity": "perplexity",
    "kld": "kld",
    "quant-report": "quant_report",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run, quantize and serve Llama 4 models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"herd.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"herd.cli.{module_name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from herd import __version__

    return f"herd {__version__}"


def main(argv: list[str] | None = None) -> int:
    from herd.errors import HerdError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HerdError as exc:
        print(f"herd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

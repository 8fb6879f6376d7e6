"""`herd quantize`: a model -> GGUF with a per-tensor type plan (preset, --tensor-type rules, or a size target).

    herd quantize -m MODEL -o out.gguf --preset UD-Q2_K_XL [--imatrix imatrix.gguf] [--tensor-type RE=TYPE]...
    herd quantize -m MODEL -o out.gguf --target-size 24GB -f calib.txt [--imatrix F]
    herd quantize -m MODEL -o out.gguf --preset Q4_K_M --dry-run      # plan + predicted size, no work
"""

from __future__ import annotations

import argparse
import re
import sys


def parse_size(text: str) -> int:
    """'24GB', '500M', '1.5GiB' or a byte count -> bytes (powers of 1024, as file managers show sizes)."""
    from herd.errors import HerdError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise HerdError(f"--target-size {text!r}: expected a size such as 24GB or 500M")
    return int(float(m[1]) * 1024 ** ("KMGT".find(m[2].upper()) + 1)) if m[2] else int(float(m[1]))


def add_parser(sub: argparse._SubParsersAction) -> None:
    from herd.quant.plan import PRESETS

    p = sub.add_parser("quantize", help="quantize a model to GGUF (presets, dynamic mixes, size targets)")
    p.add_argument("-m", "--model", default="demo", help="model directory, .gguf or hub id (default: the demo)")
    p.add_argument("-o", "--output", help="output .gguf (not needed with --dry-run)")
    p.add_argument("--preset", help=f"type mix: {', '.join(PRESETS)}")
    p.add_argument("--imatrix", help="importance matrix (llama-imatrix GGUF or .dat, or herd imatrix)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="override: tensors whose GGUF name matches REGEX get TYPE (first match wins; repeatable)")
    p.add_argument("--target-size", help="choose types to fit this file size (e.g. 24GB), by measured sensitivity")
    p.add_argument("--target-bpw", type=float, help="choose types for this many bits per weight")
    p.add_argument("-f", "--file", help="calibration text for --target-size / --target-bpw")
    p.add_argument("-c", "--ctx-size", type=int, default=256, help="calibration chunk length (default 256)")
    p.add_argument("--chunks", type=int, default=8, help="calibration chunks for the sensitivity trials (default 8)")
    p.add_argument("--types", default=None, metavar="T1,T2,...",
                   help="candidate types for --target-size / --target-bpw (default Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0)")
    p.add_argument("--sensitivity-cache", help="JSON file caching the sensitivity table between runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the predicted size; write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError
    from herd.quant import plan as plans
    from herd.quant.quantize import open_source, predicted_size, quantize

    if not args.preset and not args.target_size and not args.target_bpw and not args.tensor_type:
        raise HerdError("give --preset, --target-size, --target-bpw or --tensor-type rules")
    if args.target_size and args.target_bpw:
        raise HerdError("--target-size and --target-bpw exclude each other")
    if not args.dry_run and not args.output:
        raise HerdError("-o/--output is required (or --dry-run)")
    overrides = [plans.parse_rule(r) for r in args.tensor_type]
    if args.preset:
        plans.check_preset(args.preset)  # before loading anything
    budget_given = args.target_size or args.target_bpw
    if budget_given and not args.file:
        raise HerdError("--target-size / --target-bpw need calibration text (-f FILE)")
    target_size = parse_size(args.target_size) if args.target_size else None

    source = open_source(args.model)
    imatrix = None
    if args.imatrix:
        from herd.quant.imatrix import read_imatrix

        imatrix = read_imatrix(args.imatrix, num_experts=source.config.num_local_experts)
    plan = plans.build_plan(source.config, args.preset or ("Q8_0" if not budget_given else None), overrides)
    if budget_given:
        plan = _allocated_plan(args, source, plan, overrides, imatrix, target_size)
    size = predicted_size(source, plan, imatrix)
    print(plans.describe(plan, source.config.vocab_size).rsplit("\n", 1)[0], file=sys.stderr)
    print(f"predicted file size {size / 2**20:.2f} MiB ({size:,} bytes), {plan.bits_per_weight():.3f} bits per weight",
          file=sys.stderr)
    if args.dry_run:
        missing = plan.unencodable()
        if missing:
            print(f"note: herd cannot yet write {', '.join(missing)} (decode only)", file=sys.stderr)
        return 0
    from herd.quant.quantize import check_imatrix_covers

    plan.check_encodable()
    check_imatrix_covers(plan, imatrix)
    for f in quantize(source, args.output, plan, imatrix):
        print(f"wrote {f} ({f.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


def _allocated_plan(args, source, plan, overrides, imatrix, target_size):
    import herd
    from herd.errors import HerdError
    from herd.eval import read_text, text_chunks
    from herd.quant import allocate
    from herd.quant import plan as plans
    from herd.quant.quantize import predicted_size

    text = read_text(args.file)
    llm = herd.load(args.model, dtype="f32")
    chunks = text_chunks(llm, text, args.ctx_size, args.chunks)
    candidates = allocate.CANDIDATES
    if args.types:
        from herd.quant import formats

        candidates = tuple(formats.format_of(t).name for t in args.types.split(",") if t.strip())
        if not all(formats.format_of(t).can_encode for t in candidates):
            raise HerdError(f"--types {args.types!r}: every candidate must be a type herd can write")
    sens = allocate.measure_sensitivity(llm, chunks, imatrix, candidates, cache=args.sensitivity_cache)
    overhead = predicted_size(source, plan, imatrix) - plan.tensor_bytes()
    fixed = sum(e.nbytes for e in plan.entries if e.reason == "fixed")
    if target_size is not None:
        budget = target_size - overhead
    else:
        budget = int(args.target_bpw * plan.parameters() / 8)
    if budget <= fixed:
        raise HerdError(f"the size target leaves no room for the quantized tensors ({budget:,} bytes)")
    types = allocate.allocate(source.config, sens, budget, fixed_bytes=fixed)
    result = plans.build_plan(source.config, None, overrides, types=types)
    print(f"auto allocation: predicted KLD {allocate.predicted_kld(sens, types):.5f} (sum of per-group trials)",
          file=sys.stderr)
    return result

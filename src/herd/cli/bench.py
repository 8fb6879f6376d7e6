"""`herd bench`: prefill and decode speed and peak memory, side by side with llama.cpp on the same GGUF.

    herd bench -m MODEL [-p 256] [-n 64] [-t THREADS] [--vs-llamacpp] [-r REPEAT]

Each engine runs in its own process (so each peak RSS is its own) on the same random prompt of -p tokens,
then decodes -n tokens greedily, one at a time, with its KV cache; as llama-bench does, each first runs the
prompt and two decode steps untimed (warmup), then starts again from an empty cache. llama.cpp runs through llama-cpp-python
(the `llamacpp` extra) with the same thread count; only a .gguf can be compared. With -r the engines run
that many times, alternating, and each engine's best is reported (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def physical_cores() -> int:
    """Physical cores available to this process (llama.cpp's default thread count), from /proc/cpuinfo."""
    try:
        cores, current = set(), {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if current:
                    cores.add((current.get("physical id"), current.get("core id")))
                current = {}
                continue
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
        n = len(cores) if cores and (None, None) not in cores else 0
    except OSError:
        n = 0
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or available, available))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed and peak memory (optionally vs llama.cpp)")
    p.add_argument("-m", "--model", default="demo", help="model directory, .gguf or hub id (default: the demo)")
    p.add_argument("-p", "--n-prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="decoded tokens (default 64)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--dtype", default=None, help="herd compute dtype for unquantized weights (default as stored)")
    p.add_argument("--vs-llamacpp", action="store_true", help="also run llama.cpp on the same GGUF")
    p.add_argument("--compile", action="store_true",
                   help="herd decodes through one compiled graph per step (compiled in the untimed warmup)")
    p.add_argument("-r", "--repeat", type=int, default=1,
                   help="run each engine this many times, alternating, and keep each one's best (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child", choices=["herd", "llamacpp"], help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _prompt(n: int, vocab: int, bos: int | None) -> list[int]:
    import random

    rng = random.Random(0)
    ids = [rng.randrange(0, min(vocab, 8000)) for _ in range(n)]
    if bos is not None and ids:
        ids[0] = bos
    return ids


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_herd(args) -> dict:
    import torch

    import herd

    torch.set_num_threads(args.threads)
    from herd.quant.kernels import select_paths
    from herd.runtime.sampling import greedy

    t0 = time.perf_counter()
    llm = herd.load(args.model, dtype=args.dtype)
    if args.compile:  # its setup repacks every weight as it needs them
        llm.compile()
    else:
        select_paths(llm.model, eager=True)  # repack every quantized weight now: load time, not prefill time
    load_s = time.perf_counter() - t0
    model = llm.model
    ids = _prompt(args.n_prompt, llm.config.vocab_size, llm.config.bos_token_id)
    with torch.inference_mode():
        cache = model.new_cache(1)  # warmup, untimed (as llama-bench): kernels set up for these shapes
        token = greedy(model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1])
        t_warm = time.perf_counter()
        for _ in range(2):  # with --compile, the first of these compiles the step
            token = greedy(model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])
        warm_s = time.perf_counter() - t_warm
        cache = model.new_cache(1)
        t0 = time.perf_counter()
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1]
        prefill_s = time.perf_counter() - t0
        token = greedy(logits)
        t0 = time.perf_counter()
        for _ in range(args.n_gen):
            token = greedy(model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])
        decode_s = time.perf_counter() - t0
    out = {"load_s": load_s, "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": args.n_gen / decode_s,
           "peak_rss_mib": _peak_mib()}
    if args.compile:
        out["compile_s"] = warm_s
    return out


def _run_llamacpp(args) -> dict:
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        return {"error": "llama-cpp-python is not installed (pip install 'herd[llamacpp]')"}
    t0 = time.perf_counter()
    ref = llama_cpp.Llama(model_path=str(args.model), n_ctx=args.n_prompt + args.n_gen + 8, n_batch=max(args.n_prompt, 1),
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prompt(args.n_prompt, ref.n_vocab(), ref.token_bos())
    n_vocab = ref.n_vocab()

    def last_argmax() -> int:  # without logits_all only the last position's logits exist (no copy of them all)
        return int(np.argmax(np.ctypeslib.as_array(ref._ctx.get_logits(), shape=(n_vocab,))))

    ref.eval(ids)  # warmup, untimed (as llama-bench), then the same from an empty cache
    for _ in range(2):
        ref.eval([last_argmax()])
    ref.reset()
    t0 = time.perf_counter()
    ref.eval(ids)
    prefill_s = time.perf_counter() - t0
    token = last_argmax()
    t0 = time.perf_counter()
    for _ in range(args.n_gen):
        ref.eval([token])
        token = last_argmax()
    decode_s = time.perf_counter() - t0
    ref.close()
    return {"load_s": load_s, "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": args.n_gen / decode_s,
            "peak_rss_mib": _peak_mib()}


def _child(engine: str, args) -> dict:
    argv = [sys.executable, "-m", "herd.cli.main", "bench", "--child", engine, "-m", str(args.model),
            "-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.compile and engine == "herd":
        argv.append("--compile")
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{engine} failed: {last}"}
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError

    if args.n_prompt < 1 or args.n_gen < 1:
        raise HerdError("-p and -n must be at least 1")
    args.threads = args.threads or physical_cores()
    if args.child:
        if args.model == "demo":
            from herd.weights.demo import demo_path

            args.model = str(demo_path())
        print(json.dumps(_run_herd(args) if args.child == "herd" else _run_llamacpp(args)))
        return 0
    if args.model == "demo":
        from herd.weights.demo import demo_path

        args.model = str(demo_path())
    if args.vs_llamacpp and not str(args.model).endswith(".gguf"):
        raise HerdError(f"--vs-llamacpp needs a .gguf model, got {args.model}")
    if args.repeat < 1:
        raise HerdError("-r/--repeat must be at least 1")
    engines = ["herd"] + (["llamacpp"] if args.vs_llamacpp else [])
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(args.repeat):  # alternating, so a slow phase of a shared machine hits both engines alike
        for engine in engines:
            runs[engine].append(_child(engine, args))
    results = {("llama.cpp" if e == "llamacpp" else e): best_of(r) for e, r in runs.items()}
    if args.json:
        print(json.dumps(results))
        return 0 if all("error" not in r for r in results.values()) else 1
    print(table(results, args))
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise HerdError("; ".join(errors))
    return 0


def best_of(runs: list[dict]) -> dict:
    """Each engine's best run per measure (highest tok/s, lowest load time; the highest peak RSS), with the
    number of runs; an error if every run failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = {"prefill_tok_s": max(r["prefill_tok_s"] for r in ok), "decode_tok_s": max(r["decode_tok_s"] for r in ok),
            "load_s": min(r["load_s"] for r in ok), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok), "runs": len(ok)}
    if all("compile_s" in r for r in ok):
        best["compile_s"] = min(r["compile_s"] for r in ok)
    return best


def table(results: dict, args) -> str:
    engines = [e for e, r in results.items() if "error" not in r]
    rows = [("prefill tok/s", "prefill_tok_s", "{:.1f}"), ("decode tok/s", "decode_tok_s", "{:.2f}"),
            ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("load s", "load_s", "{:.2f}")]
    head = f"| {Path(str(args.model)).name}, -p {args.n_prompt} -n {args.n_gen} -t {args.threads} | " + " | ".join(engines)
    ratio = len(engines) == 2
    lines = [head + (" | herd / llama.cpp |" if ratio else " |"), "|---" * (len(engines) + 1 + ratio) + "|"]
    if any("compile_s" in results[e] for e in engines):
        rows.append(("compile s (first step)", "compile_s", "{:.2f}"))
    for label, key, fmt in rows:
        vals = [results[e].get(key) for e in engines]
        cells = " | ".join("-" if v is None else fmt.format(v) for v in vals)
        both = ratio and None not in vals
        lines.append(f"| {label} | {cells} |" + (f" {vals[0] / vals[1]:.2f}x |" if both else " - |" if ratio else ""))
    return "\n".join(lines)

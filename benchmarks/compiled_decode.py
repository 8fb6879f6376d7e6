"""Decode step time, compiled (herd.runtime.compiled) vs eager, interleaved in one process on one cache.

    python benchmarks/compiled_decode.py MODEL [-p 256] [-t THREADS] [--rounds 6] [--steps 16]

Both modes share the model and the cache and alternate every `--steps` steps, so a shared machine's drift
(which moves whole-process benchmarks by ±20%) hits both alike; each mode's median over the rounds is kept.
Prints a markdown table with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    import herd
    from herd.cli.bench import _prompt, physical_cores
    from herd.runtime.compiled import compile_decode
    from herd.runtime.sampling import greedy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or physical_cores())

    llm = herd.load(args.model)
    model = llm.model
    t0 = time.perf_counter()
    step = compile_decode(model)
    ids = _prompt(args.n_prompt, llm.config.vocab_size, llm.config.bos_token_id)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.inference_mode():
        cache = model.new_cache(1)
        token = greedy(model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1])
        token = greedy(model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])  # compiles
        compile_s = time.perf_counter() - t0
        for _ in range(args.rounds):
            for mode in times:
                if mode == "eager":
                    model.__dict__.pop("_decode_step")
                else:
                    model.__dict__["_decode_step"] = step
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    token = greedy(model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])
                times[mode].append((time.perf_counter() - t0) / args.steps * 1e3)
    eager, compiled = (statistics.median(times[m]) for m in ("eager", "compiled"))
    print(f"| {args.model.rsplit('/', 1)[-1]}, -p {args.n_prompt}, {args.rounds} x {args.steps} steps each | eager | compiled "
          f"| eager / compiled |\n|---|---|---|---|\n| ms per decode step (median) | {eager:.2f} | {compiled:.2f} "
          f"| {eager / compiled:.2f}x |\n\n(repacking + compiling + first step: {compile_s:.1f} s)")


if __name__ == "__main__":
    main()

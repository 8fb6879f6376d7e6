"""Decode step time with repacked weights on 2 MiB pages vs 4 KiB pages, in one process.

    python benchmarks/huge_pages_ab.py MODEL [-p 256] [-t THREADS] [--rounds 12] [--steps 16]

The model is loaded twice, once with ``kernels.huge_pages``/``huge_empty`` off (as ``HERD_HUGE_PAGES=0``)
and once on, both decoding through the compiled step; the two alternate every `--steps` steps, so a shared
machine's drift (±20% between processes) hits both alike. Prints each one's median and best ms per step,
its AnonHugePages, and its load time (repacking included).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))


def main() -> None:
    import torch

    import herd
    from herd.cli.bench import _prompt, physical_cores
    from herd.quant import kernels
    from herd.runtime.sampling import greedy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or physical_cores())

    runs = {}
    for label, on in (("4 KiB pages", False), ("2 MiB pages", True)):
        kernels._huge_pages_on = on
        before, t0 = _anon_huge_kib(), time.perf_counter()
        llm = herd.load(args.model)
        kernels.select_paths(llm.model, eager=True)
        llm.compile()
        runs[label] = {"llm": llm, "load_s": time.perf_counter() - t0, "huge_mib": (_anon_huge_kib() - before) / 1024,
                       "ms": []}
    ids = _prompt(args.n_prompt, runs["4 KiB pages"]["llm"].config.vocab_size,
                  runs["4 KiB pages"]["llm"].config.bos_token_id)
    with torch.inference_mode():
        for r in runs.values():
            model = r["llm"].model
            r["cache"] = model.new_cache(1)
            r["token"] = greedy(model(torch.tensor([ids]), cache=r["cache"], last_only=True)[0, -1])
            for _ in range(3):  # the first compiles the step
                r["token"] = greedy(model(torch.tensor([[r["token"]]]), cache=r["cache"], last_only=True)[0, -1])
        for _ in range(args.rounds):
            for r in runs.values():
                model, t0 = r["llm"].model, time.perf_counter()
                for _ in range(args.steps):
                    r["token"] = greedy(model(torch.tensor([[r["token"]]]), cache=r["cache"], last_only=True)[0, -1])
                r["ms"].append((time.perf_counter() - t0) / args.steps * 1e3)
    base, huge = (statistics.median(runs[k]["ms"]) for k in runs)
    print(f"| {args.model.rsplit('/', 1)[-1]}, -p {args.n_prompt}, {args.rounds} x {args.steps} steps each "
          "| ms per step (median) | best | AnonHugePages MiB | load s |\n|---|---|---|---|---|")
    for label, r in runs.items():
        print(f"| {label} | {statistics.median(r['ms']):.2f} | {min(r['ms']):.2f} | {r['huge_mib']:.0f} | {r['load_s']:.1f} |")
    print(f"\n4 KiB / 2 MiB: {base / huge:.3f}x")


if __name__ == "__main__":
    main()

"""Load a Q4_K GGUF and run one token: herd vs llama-cpp-python, time and peak resident memory.

Builds a random llama4 model as a Q4_K GGUF (every matrix Q4_K, norms and router F32, the real 202,048-token
vocabulary) with herd's writer, then loads it and computes the logits of one token in each engine, each in
its own subprocess so that ru_maxrss is that engine's peak. "baseline" is the process's RSS after its imports
(Python + torch, or Python + llama_cpp) and before the model is loaded.

    python benchmarks/load_gguf.py [--hidden 1024] [--layers 8] [--experts 16] [--expert-width 1024]
                                   [--threads 2] [--keep PATH]

Random weights: values are tiled from a small pool of quantized random rows (quantizing hundreds of millions
of weights in pure torch would take far longer than the benchmark), which changes nothing about loading or
the work per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(path: Path, args) -> None:
    import torch

    from herd.config import Config
    from herd.quant import formats
    from herd.quant.qtensor import QTensor
    from herd.weights.gguf_write import is_quantizable, tensor_plan, write_gguf

    h, w = args.hidden, args.expert_width
    config = Config(
        vocab_size=202048, hidden_size=h, intermediate_size=w, intermediate_size_mlp=2 * w,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=h // 8,
        num_local_experts=args.experts, num_experts_per_tok=1, moe_layers=tuple(range(args.layers)),
        no_rope_layers=tuple(int((i + 1) % 4 != 0) for i in range(args.layers)),
        layer_types=tuple("chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(args.layers)),
        attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192.0,
        attn_scale=0.1, rope_theta=500000.0, rope_scaling=None,
    )
    shapes = dict(tensor_plan(config))
    pools: dict[int, torch.Tensor] = {}

    def get(name):
        shape = shapes[name]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if not is_quantizable(name, shape):
            if name.endswith("norm.weight"):
                return 1.0 + 0.1 * torch.randn(shape, generator=g)
            return 0.1 * torch.randn(shape, generator=g)
        row = shape[-1]
        if row not in pools:
            pools[row] = formats.quantize(0.05 * torch.randn(61, row, generator=g), "Q4_K")
        rows = math.prod(shape[:-1])
        pool = pools[row].roll(int(torch.randint(0, 61, (1,), generator=g)), 0)
        return QTensor(pool.repeat(rows // 61 + 1, 1)[:rows].contiguous(), "Q4_K", shape)

    write_gguf(path, config, get, None, qtypes="Q4_K", name="bench-q4k")


def child_herd(path: str, threads: int) -> dict:
    import torch

    import herd

    torch.set_num_threads(threads)
    # Building the model on the meta device makes torch import torch._dynamo (~2.5 s, ~75 MB) the first time
    # (RoPE's `1.0 / t` goes through torch._refs there); counted as import cost, not model memory.
    import torch._dynamo  # noqa: F401

    base = _rss_mib()
    t0 = time.perf_counter()
    llm = herd.load(path)
    t1 = time.perf_counter()
    llm.logits(torch.tensor([[200000]]))
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "token_s": t2 - t1, "baseline_mib": base, "peak_mib": _peak_mib(),
            "rss_after_mib": _rss_mib()}


def child_llamacpp(path: str, threads: int) -> dict:
    import llama_cpp

    base = _rss_mib()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
    t1 = time.perf_counter()
    llm.eval([200000])
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "token_s": t2 - t1, "baseline_mib": base, "peak_mib": _peak_mib(),
            "rss_after_mib": _rss_mib()}


def run_child(engine: str, path: Path, threads: int) -> dict | str:
    proc = subprocess.run([sys.executable, __file__, "--child", engine, str(path), "--threads", str(threads)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-width", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="write the GGUF here (and reuse it if it exists)")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path = args.child
        fn = child_herd if engine == "herd" else child_llamacpp
        print(json.dumps(fn(path, args.threads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench-q4k.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            build(path, args)
            print(f"built {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        size = path.stat().st_size / 2**20
        results = {"herd": run_child("herd", path, args.threads)}
        try:
            import llama_cpp  # noqa: F401

            results["llama-cpp-python"] = run_child("llamacpp", path, args.threads)
        except ImportError:
            results["llama-cpp-python"] = "not installed (pip install -e '.[llamacpp]')"
        print(f"\nQ4_K GGUF: {size:.1f} MiB; hidden {args.hidden}, {args.layers} layers x {args.experts} experts x "
              f"{args.expert_width}, vocab 202,048; {args.threads} threads; one token, no prompt cache\n")
        print("| engine | load (s) | first token (s) | baseline RSS (MiB) | peak RSS (MiB) | peak - baseline (MiB) "
              "| (peak - baseline) / file |")
        print("|---|---|---|---|---|---|---|")
        for engine, r in results.items():
            if isinstance(r, str):
                print(f"| {engine} | {r} | | | | | |")
                continue
            extra = r["peak_mib"] - r["baseline_mib"]
            print(f"| {engine} | {r['load_s']:.2f} | {r['token_s']:.3f} | {r['baseline_mib']:.0f} | "
                  f"{r['peak_mib']:.0f} | {extra:.0f} | {extra / size:.2f} |")


if __name__ == "__main__":
    main()

"""Load test of `herd serve` on loopback: N concurrent streaming clients for a bounded time.

Starts the server in-process (uvicorn on 127.0.0.1, a free port) once per --parallel value, runs N
streaming chat clients (the official `openai` client) for --seconds, and prints requests/s, tokens/s,
p50/p99 time to first token and errors, with the aggregate tokens/s of --parallel 8 relative to 1.

    python benchmarks/serve_load.py [-m MODEL_DIR] [--clients 8] [--seconds 20] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def tiny_model(out: Path) -> Path:
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    import torch

    cfg = Llama4TextConfig(vocab_size=202048, hidden_size=256, intermediate_size=512, intermediate_size_mlp=512,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           num_local_experts=16, bos_token_id=200000, eos_token_id=[200001, 200007, 200008])
    torch.manual_seed(0)
    Llama4ForCausalLM(cfg).save_pretrained(out)
    return out


def run_load(llm, parallel: int, clients: int, seconds: float, max_tokens: int) -> dict:
    import openai
    import uvicorn

    from herd.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, parallel=parallel, ctx=1024), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ttfts, tokens, done, errors = [], [0], [0], [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            t0 = time.perf_counter()
            first = None
            try:
                stream = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"Client {i} request {n}: tell me a story."}],
                    max_tokens=max_tokens, temperature=0.6, stream=True, stream_options={"include_usage": True})
                used = 0
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage:
                        used = chunk.usage.completion_tokens
                with lock:
                    tokens[0] += used
                    done[0] += 1
                    if first is not None:
                        ttfts.append(first)
            except Exception:
                with lock:
                    errors[0] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=30)
    ttfts.sort()
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    return {"parallel": parallel, "requests": done[0], "req_s": done[0] / elapsed, "tok_s": tokens[0] / elapsed,
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p99": pct(0.99), "errors": errors[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="model dir (default: a random 16-expert model, hidden 256)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    import herd

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp) / "m")
        llm = herd.load(path)
    rows = [run_load(llm, p, args.clients, args.seconds, args.max_tokens) for p in (1, 8)]
    print(f"{args.clients} streaming clients, {args.seconds:g} s each run, max_tokens {args.max_tokens}, {args.threads} threads")
    print("| --parallel | requests | req/s | tokens/s | TTFT p50 (s) | TTFT p99 (s) | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['parallel']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['errors']} |")
    print(f"aggregate tokens/s, parallel 8 / parallel 1: {rows[1]['tok_s'] / max(rows[0]['tok_s'], 1e-9):.2f}x")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""herd vs transformers: prefill and single-token decode on the same random Llama 4 MoE config (16 experts).

transformers runs every expert on every token (dense bmm); herd groups tokens by expert and runs only the
selected ones. Both run fp32 (or --dtype bf16) on the CPU with the same thread count, in one process.

    python benchmarks/moe_forward.py [--hidden 512] [--prompt 128] [--decode 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def build(args):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        intermediate_size_mlp=2 * args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden // 8,
        num_local_experts=16,
        num_experts_per_tok=1,
        attention_chunk_size=8192,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    import herd

    hf = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        llm = herd.load(tmp, dtype=dtype)
    hf = hf.to(dtype)
    ids = torch.randint(2, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def hf_prefill():
        with torch.inference_mode():
            hf(ids, use_cache=False)

    def herd_prefill():
        with torch.inference_mode():
            llm.model(ids, last_only=True)

    def hf_decode():
        with torch.inference_mode():
            out = hf(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.decode):
                out = hf(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0

    def herd_decode():
        with torch.inference_mode():
            cache = llm.model.new_cache(1)
            tok = llm.model(ids, cache=cache, last_only=True).argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.decode):
                tok = llm.model(tok, cache=cache, last_only=True).argmax(-1)
            return time.perf_counter() - t0

    with torch.inference_mode():  # both compute the same logits before anything is timed
        diff = (hf(ids).logits.float() - llm.model(ids).float()).abs().max().item()

    rows = []
    t_hf, t_herd = best_of(hf_prefill, args.repeat), best_of(herd_prefill, args.repeat)
    rows.append(("prefill", args.prompt / t_hf, args.prompt / t_herd))
    d_hf = min(hf_decode() for _ in range(args.repeat))
    d_herd = min(herd_decode() for _ in range(args.repeat))
    rows.append(("decode", args.decode / d_hf, args.decode / d_herd))

    params = sum(p.numel() for p in hf.parameters())
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, 16 experts x {args.expert_width}, vocab {args.vocab}, "
        f"{params / 1e6:.0f}M params, {args.dtype}, {args.threads} threads; max |dlogits| herd vs transformers {diff:.1e}"
    )
    print(f"| phase | transformers tok/s | herd tok/s | herd / transformers |")
    print(f"|---|---|---|---|")
    for phase, a, b in rows:
        label = f"{phase} ({args.prompt} tok)" if phase == "prefill" else f"{phase} (1 tok x {args.decode})"
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()

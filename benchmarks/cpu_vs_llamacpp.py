"""CPU speed, herd vs llama.cpp (and vs transformers): the bench model of the CPU-speed issue as BF16, Q8_0,
Q4_K_M and a low-bit mix, each run by `herd bench --vs-llamacpp` (every engine in its own process).

    python benchmarks/cpu_vs_llamacpp.py [--dir /work/bench] [-p 256] [-n 64] [-t THREADS] [-r 3] [--only NAME ...]
                                         [--compile]

Bench model: random Llama 4, hidden 1024, 8 layers (all MoE), 16 experts of width 1024, top-1, 8/2 heads,
head_dim 128, vocab 202,048 (863M parameters, ~278M read per decoded token). The bf16 checkpoint is made
with transformers (random init) and is what transformers, herd bf16 and herd f32 run; the BF16 GGUF is
converted from it with `herd convert`. The quantized GGUFs tile each matrix from a small pool of quantized
random rows (quantizing 863M weights in torch would take far longer than the benchmark), which changes
nothing about the work per token:

* Q8_0: every quantizable matrix Q8_0;
* Q4_K_M: herd's Q4_K_M plan (llama.cpp's preset rules: Q4_K, Q6_K for output and part of ffn_down);
* low-bit: Q2_K routed experts, Q4_K attention and shared expert, Q6_K output, Q4_K embedding.

Files are kept in --dir and reused. Results print as markdown tables (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

SHAPE = dict(hidden=1024, layers=8, experts=16, expert_width=1024, heads=8, kv_heads=2, head_dim=128, vocab=202048)


def hf_config():
    from transformers import Llama4TextConfig

    s = SHAPE
    return Llama4TextConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["expert_width"],
        intermediate_size_mlp=2 * s["expert_width"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        num_local_experts=s["experts"], num_experts_per_tok=1, interleave_moe_layer_step=1,
        attention_chunk_size=8192, use_qk_norm=True, floor_scale=8192, attn_scale=0.1,
        attn_temperature_tuning=True, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=None,
        tie_word_embeddings=False,
    )


def build_hf(directory: Path) -> None:
    """Random bf16 checkpoint (written to a temp dir, renamed when complete)."""
    import torch
    from transformers import Llama4ForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama4ForCausalLM(hf_config())
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(directory)


def plan_types(config, kind: str) -> dict[str, str]:
    """Canonical name -> type for the quantized files."""
    from herd.weights.gguf_write import is_quantizable, tensor_plan

    if kind == "Q4_K_M":
        from herd.quant.plan import build_plan

        return {e.name: e.qtype for e in build_plan(config, "Q4_K_M").entries if e.qtype != "F32"}
    types = {}
    for name, shape in tensor_plan(config):
        if not is_quantizable(name, shape):
            continue
        if kind == "Q8_0":
            types[name] = "Q8_0"
        elif kind == "lowbit":
            types[name] = "Q2_K" if "experts." in name else ("Q6_K" if name == "lm_head.weight" else "Q4_K")
    return types


def build_quantized(path: Path, hf_dir: Path, kind: str) -> None:
    import torch

    from herd.quant import formats
    from herd.quant.qtensor import QTensor
    from herd.weights.gguf import GGUFFile
    from herd.weights.gguf_write import is_quantizable, tensor_plan, write_gguf

    bf16 = GGUFFile(hf_dir.parent / "bench-BF16.gguf")
    config = bf16.config()
    types = plan_types(config, kind)
    shapes = dict(tensor_plan(config))
    source = dict(bf16.canonical_tensors())
    pools: dict[tuple[str, int], torch.Tensor] = {}

    def get(name):
        shape = shapes[name]
        if not is_quantizable(name, shape) or name not in types:
            return source[name].float()
        qtype, row = types[name], shape[-1]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if (qtype, row) not in pools:
            pools[(qtype, row)] = formats.quantize(0.05 * torch.randn(61, row, generator=g), qtype)
        rows = math.prod(shape[:-1])
        pool = pools[(qtype, row)].roll(int(torch.randint(0, 61, (1,), generator=g)), 0)
        return QTensor(pool.repeat(rows // 61 + 1, 1)[:rows].contiguous(), qtype, shape)

    write_gguf(path, config, get, bf16, qtypes=types, name=f"bench-{kind}")


def ensure_files(d: Path, only: list[str]) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    hf_dir = d / "bench-hf-bf16"
    if not hf_dir.exists():
        t0 = time.perf_counter()
        build_hf(hf_dir)
        print(f"built {hf_dir} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    files = {"hf": hf_dir, "BF16": d / "bench-BF16.gguf"}
    if not files["BF16"].exists():
        from herd.weights.gguf_write import convert_hf

        convert_hf(hf_dir, files["BF16"], outtype="bf16")
    for kind in ("Q8_0", "Q4_K_M", "lowbit"):
        files[kind] = d / f"bench-{kind}.gguf"
        if kind in only and not files[kind].exists():
            t0 = time.perf_counter()
            build_quantized(files[kind], hf_dir, kind)
            print(f"built {files[kind]} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return files


# ---------------------------------------------------------------------------------------------- runs


def herd_bench(model: Path, args, *extra: str) -> dict:
    argv = [sys.executable, "-m", "herd.cli.main", "bench", "-m", str(model), "-p", str(args.n_prompt),
            "-n", str(args.n_gen), "-t", str(args.threads), "-r", str(args.repeat), "--json", *extra]
    if args.compile:
        argv.append("--compile")
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"herd": {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}}
    return json.loads(lines[-1])


def transformers_child(hf_dir: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    import resource

    import torch
    from transformers import Llama4ForCausalLM

    from herd.cli.bench import _prompt

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = Llama4ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt(n_prompt, model.config.vocab_size, model.config.bos_token_id)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(n_gen):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": n_gen / decode_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def transformers_bench(hf_dir: Path, args) -> dict:
    argv = [sys.executable, __file__, "--transformers-child", str(hf_dir), "-p", str(args.n_prompt), "-n",
            str(args.n_gen), "-t", str(args.threads)]
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}


def kernel_error(text_file: Path, n_tokens: int, types: list[str]) -> str:
    """Added error of the fast paths: the demo model (trained, so its distributions mean something) with its
    weights requantized to each type, decoded token by token (the fused-kernel path) with the fast paths on,
    against the same weights decoded exactly; -> a markdown table of mean KL divergence and top-1 agreement."""
    import torch

    import herd
    from herd.quant import kernels
    from herd.quant.qtensor import QTensor

    base = herd.load("demo")
    ids = base.tokenizer.encode(text_file.read_text(encoding="utf-8")[:20000], bos=True)[:n_tokens]
    lines = ["| type | path | mean KLD (fast vs exact) | top-1 agreement |", "|---|---|---|---|"]

    def decode_logits(model) -> torch.Tensor:
        cache, out = model.new_cache(1), []
        with torch.inference_mode():
            for t in ids:
                out.append(model(torch.tensor([[t]]), cache=cache)[0, -1].float())
        return torch.stack(out)

    for qtype in types:
        model = herd.load("demo").model
        for m in model.modules():
            for name, w in list(vars(m).items()):
                if isinstance(w, QTensor):
                    object.__setattr__(m, name, QTensor.quantize(w.dequantize(), qtype))
        with kernels.exact():
            exact = decode_logits(model)
        for vnni in (True, False):  # the VNNI path, then the paths of CPUs without int8 dot products
            kernels._VNNI = vnni
            for m in model.modules():
                for w in vars(m).values():
                    if isinstance(w, QTensor):
                        w._fast.clear()
                        w._fused.clear()
            kernels.select_paths(model)
            paths = {w._fast_path for m in model.modules() for w in vars(m).values() if isinstance(w, QTensor)}
            fast = decode_logits(model)
            kld = torch.nn.functional.kl_div(fast.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                             reduction="none").sum(-1).mean().item()
            top1 = (fast.argmax(-1) == exact.argmax(-1)).float().mean().item()
            lines.append(f"| {qtype} | {', '.join(sorted(paths - {None}))} | {kld:.2e} | {top1:.4f} |")
            print(lines[-1], file=sys.stderr)
        kernels._VNNI = None
    return "\n".join(lines)


def row(label: str, a: dict, b: dict) -> str:
    if "error" in a or "error" in b:
        return f"| {label} | {a.get('error', '')} {b.get('error', '')} | | | | | |"
    return (f"| {label} | {a['prefill_tok_s']:.1f} | {b['prefill_tok_s']:.1f} | {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x "
            f"| {a['decode_tok_s']:.2f} | {b['decode_tok_s']:.2f} | {a['decode_tok_s'] / b['decode_tok_s']:.2f}x "
            f"| {a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} |")


def main() -> None:
    from herd.cli.bench import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/work/bench"))
    ap.add_argument("-p", "--n-prompt", type=int, default=256)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-r", "--repeat", type=int, default=3, help="runs per engine, alternating; best kept")
    ap.add_argument("--only", nargs="*", default=["BF16", "Q8_0", "Q4_K_M", "lowbit", "transformers"])
    ap.add_argument("--compile", action="store_true", help="herd decodes through its compiled step (herd bench --compile)")
    ap.add_argument("--kld", type=Path, metavar="TEXT", help="instead: the fast paths' added error on the demo model")
    ap.add_argument("--kld-tokens", type=int, default=256)
    ap.add_argument("--transformers-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kld:
        print(kernel_error(args.kld, args.kld_tokens, ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q5_K",
                                                       "Q6_K", "Q3_K", "Q2_K", "IQ4_XS"]))
        return
    args.threads = args.threads or physical_cores()
    if args.transformers_child:
        print(json.dumps(transformers_child(args.transformers_child, args.n_prompt, args.n_gen, args.threads)))
        return
    files = ensure_files(args.dir, args.only)
    results: dict[str, dict] = {}
    head = ("| model | herd prefill tok/s | llama.cpp prefill tok/s | ratio | herd decode tok/s "
            "| llama.cpp decode tok/s | ratio | peak RSS MiB herd / llama.cpp |\n|---|---|---|---|---|---|---|---|")
    lines = []
    for kind in ("BF16", "Q8_0", "Q4_K_M", "lowbit"):
        if kind not in args.only:
            continue
        r = results[kind] = herd_bench(files[kind], args, "--vs-llamacpp")
        lines.append(row(f"{kind} ({files[kind].stat().st_size / 2**20:.0f} MiB)", r["herd"], r.get("llama.cpp", {"error": "-"})))
        print(lines[-1], file=sys.stderr)
    compiled = " (herd: --compile)" if args.compile else ""
    print(f"\n-p {args.n_prompt} -n {args.n_gen} -t {args.threads}{compiled}\n\n{head}\n" + "\n".join(lines))
    if "transformers" in args.only:
        from herd.cli.bench import best_of

        runs: dict[str, list[dict]] = {"transformers bf16": [], "herd bf16": [], "herd f32": []}
        for _ in range(args.repeat):  # alternating, best of each kept (as herd bench -r does)
            runs["transformers bf16"].append(transformers_bench(files["hf"], args))
            runs["herd bf16"].append(herd_bench(files["hf"], args, "--dtype", "bf16", "-r", "1")["herd"])
            runs["herd f32"].append(herd_bench(files["hf"], args, "--dtype", "f32", "-r", "1")["herd"])
        hf = {name: best_of(r) for name, r in runs.items()}
        base = hf["transformers bf16"]
        print("\n| engine (bf16 checkpoint) | prefill tok/s | decode tok/s | peak RSS MiB | decode vs transformers |\n"
              "|---|---|---|---|---|")
        for name, r in hf.items():
            if "error" in r:
                print(f"| {name} | {r['error']} | | | |")
                continue
            ratio = r["decode_tok_s"] / base["decode_tok_s"] if "error" not in base else float("nan")
            print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r['peak_rss_mib']:.0f} | {ratio:.2f}x |")
        results["hf"] = hf
    out = args.dir / "results.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()

"""`herd info`: what a model is — config, parameters (total / active), memory per token — without running it."""

from __future__ import annotations

import argparse

from herd.config import Config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model (directory, .gguf, hub id or preset) without running it")
    p.add_argument("model", nargs="?", help="model directory, .gguf file, hub id, or preset name")
    p.add_argument("-m", "--model", dest="model_opt", help="same as the positional MODEL")
    p.add_argument("--preset", help="a preset config with no weights: scout | maverick")
    p.add_argument("--bpw", type=float, action="append", help="bits per weight to plan for (repeatable; default 16, 8, 4.5, 2)")
    p.set_defaults(func=run)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def describe_config(config: Config, bpws: list[float], checked_groups: dict[str, int] | None = None) -> str:
    c = config
    moe = len(c.moe_layers)
    nope = sum(1 for i in range(c.num_hidden_layers) if not c.uses_rope(i))
    lines = [
        f"name               {c.name or '-'}",
        f"architecture       {c.architecture}",
        f"layers             {c.num_hidden_layers} ({moe} MoE, {c.num_hidden_layers - moe} dense; {nope} NoPE/full, "
        f"{c.num_hidden_layers - nope} RoPE/chunked)",
        f"hidden / heads     {c.hidden_size} / {c.num_attention_heads} q, {c.num_key_value_heads} kv, head_dim {c.head_dim}",
        f"experts            {c.num_local_experts} routed (top-{c.num_experts_per_tok}, width {c.intermediate_size}) + shared",
        f"dense FFN width    {c.intermediate_size_mlp}",
        f"attention          chunk {c.attention_chunk_size}, qk_norm {c.use_qk_norm}, temperature tuning "
        f"{c.attn_temperature_tuning} (floor {c.floor_scale:g}, scale {c.attn_scale:g})",
        f"rope               theta {c.rope_theta:g}, scaling {c.rope_scaling}",
        f"context            {c.max_position_embeddings} positions, vocab {c.vocab_size}",
        "",
        "parameters by group:",
    ]
    counts = c.parameter_counts()
    for group, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<16} {_fmt_count(n):>10}  ({n:,})")
    total, active = c.num_parameters(), c.active_parameters()
    lines += [
        f"total parameters   {_fmt_count(total)} ({total:,})",
        f"active per token   {_fmt_count(active)} ({active:,})",
        "",
        "memory plan (weights; per token = weights read to decode one token):",
    ]
    for bpw in bpws:
        lines.append(
            f"  {bpw:>5g} bpw: weights {_fmt_bytes(total * bpw / 8):>10}, per token {_fmt_bytes(active * bpw / 8):>10}"
        )
    chunked = sum(1 for i in range(c.num_hidden_layers) if c.is_chunked(i))
    ring = chunked * 2 * c.num_key_value_heads * c.head_dim * 2.0 * (c.attention_chunk_size or 0)
    lines.append(
        f"KV cache (bf16): {_fmt_bytes(c.kv_bytes_per_token(2.0))} per token of context in full-attention layers, "
        f"plus at most {_fmt_bytes(ring)} per sequence for the {chunked} chunked layers"
    )
    if checked_groups is not None:
        lines.append("checkpoint: every tensor present with the expected shape")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from herd.errors import HerdError

    bpws = args.bpw or [16.0, 8.0, 4.5, 2.0]
    source = args.model or args.model_opt
    if args.preset:
        print(describe_config(Config.preset(args.preset), bpws))
        return 0
    if not source:
        raise HerdError("info: give a MODEL (directory, .gguf, hub id) or --preset scout|maverick")
    if source.lower() in ("scout", "maverick"):
        print(describe_config(Config.preset(source), bpws))
        return 0
    from herd.weights import hub

    kind, path = hub.resolve(source)
    if kind == "gguf":
        from herd.weights.gguf import describe_gguf

        print(describe_gguf(path))
        return 0
    from herd.weights.loader import check_safetensors

    config = Config.from_file(path / "config.json")
    groups = check_safetensors(path, config)
    print(describe_config(config, bpws, groups))
    return 0

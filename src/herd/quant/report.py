"""The quantization quality report: every preset, with and without an importance matrix, size-matched auto
allocations, and per-class sensitivity, measured as KL divergence from the unquantized model on held-out text.

Every quantized model is written as a real GGUF (the same bytes ``herd quantize`` writes) and loaded back, so
the numbers are those of the files users would run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from . import plan as plans

REPORT_PRESETS = ("Q2_K", "UD-Q2_K_XL", "Q3_K_M", "UD-Q3_K_XL", "Q4_K_M", "UD-Q4_K_XL", "Q6_K", "Q8_0")
CLASSES = {  # report class -> plan groups
    "routed experts": ("experts_gate_up", "experts_down"),
    "shared expert": ("shared_expert", "dense_ffn"),
    "attention": ("attention",),
    "embeddings": ("embeddings",),
    "output": ("output",),
}


@dataclass
class Row:
    name: str
    imatrix: bool
    bytes: int
    bpw: float
    ppl: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    top1: float
    kind: str  # "llama.cpp mix" | "dynamic" | "auto" | "class"


def evaluate_plan(source, plan, base, imatrix, workdir: Path, label: str) -> dict:
    import herd

    from ..eval.kld import compare
    from .quantize import quantize

    path = workdir / f"{label}.gguf"
    quantize(source, path, plan, imatrix, progress=False)
    llm = herd.load(path, dtype="f32")
    stats = compare(llm, base, progress=False)
    stats["bytes"] = path.stat().st_size
    del llm
    path.unlink()
    return stats


def run_report(model, eval_text: str, calib_text: str, out_md: Path, ctx: int = 512, eval_chunks: int = 16,
               calib_chunks: int = 32, sens_chunks: int = 8, class_type: str = "Q2_K", progress: bool = True) -> list[Row]:
    import herd

    from ..eval.kld import base_run
    from ..eval.perplexity import text_chunks
    from . import allocate
    from .imatrix import collect_imatrix
    from .quantize import open_source, predicted_size

    t0 = time.time()
    base_llm = herd.load(model, dtype="f32")
    source = open_source(base_llm)
    config = source.config
    base = base_run(base_llm, text_chunks(base_llm, eval_text, ctx, eval_chunks), progress=progress)
    calib = text_chunks(base_llm, calib_text, ctx, calib_chunks)
    imatrix = collect_imatrix(base_llm, calib, progress=progress, dataset="calibration")
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="herd-report-"))

    def add(name, plan, imx, kind):
        stats = evaluate_plan(source, plan, base, imx, work, name.replace("/", "_"))
        rows.append(Row(name, imx is not None, stats["bytes"], 8 * plan.tensor_bytes() / plan.parameters(),
                        stats["ppl"], stats["kld_mean"], stats["kld_median"], stats["kld_p99"],
                        stats["top1_agreement"], kind))
        bar.set_postfix(last=f"{name}{' +imatrix' if imx is not None else ''} KLD {stats['kld_mean']:.4f}")
        bar.update(1)

    jobs = [(p, imx) for p in REPORT_PRESETS for imx in ((None,) if p == "Q8_0" else (None, imatrix))]
    bar = tqdm(total=len(jobs) + 2 + len(CLASSES), desc="report", unit="model", disable=not progress)
    for preset, imx in jobs:
        kind = "dynamic" if preset.startswith("UD-") else "llama.cpp mix"
        add(preset, plans.build_plan(config, preset), imx, kind)

    # auto allocation at the sizes of the two lowest dynamic presets
    sens = allocate.measure_sensitivity(base_llm, calib[:sens_chunks], imatrix, progress=False)
    for preset in ("UD-Q2_K_XL", "UD-Q3_K_XL"):
        ref = plans.build_plan(config, preset)
        target = predicted_size(source, ref, imatrix)
        overhead = target - ref.tensor_bytes()
        fixed = sum(e.nbytes for e in ref.entries if e.reason == "fixed")
        types = allocate.allocate(config, sens, target - overhead, fixed_bytes=fixed)
        add(f"auto @ {preset} size", plans.build_plan(config, None, types=types), imatrix, "auto")

    # per class: only that class quantized (to class_type, with the imatrix), everything else F32
    for cls, groups in CLASSES.items():
        everything = plans.build_plan(config, "Q8_0").entries
        types = {e.name: class_type if e.group in groups else "F32" for e in everything if e.reason != "fixed"}
        if class_type not in types.values():
            bar.update(1)
            continue
        add(f"only {cls} {class_type}", plans.build_plan(config, None, types=types), imatrix, "class")
    bar.close()
    write_markdown(out_md, rows, base, config, dict(model=str(model), ctx=ctx, eval_chunks=len(base.chunks),
                                                    calib_chunks=len(calib), sens_chunks=sens_chunks,
                                                    class_type=class_type, minutes=(time.time() - t0) / 60))
    return rows


def write_markdown(path: Path, rows: list[Row], base, config, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    plot_kld_vs_bpw(png, rows)
    lines = [
        "# Quantization report",
        "",
        f"Generated by `herd quant-report` ({meta['minutes']:.1f} min). Base: `{meta['model']}` in F32, "
        f"{config.num_hidden_layers} layers, {config.num_local_experts} experts. KL divergence of each quantized "
        f"GGUF's next-token distributions from the base on {meta['eval_chunks']} held-out chunks of "
        f"{meta['ctx']} tokens (second half of each chunk scored: {sum(len(t) for t in base.targets)} tokens); "
        f"base perplexity {math.exp(base.nll):.3f}. The imatrix comes from "
        f"{meta['calib_chunks']} calibration chunks of a different text; auto allocation measured its "
        f"sensitivity table on {meta['sens_chunks']} of them.",
        "",
        "| model | imatrix | size (MiB) | bpw | PPL | mean KLD | median KLD | p99 KLD | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.kind == "class":
            continue
        lines.append(f"| {r.name} | {'yes' if r.imatrix else 'no'} | {r.bytes / 2**20:.2f} | {r.bpw:.3f} | {r.ppl:.3f} | "
                     f"{r.kld_mean:.5f} | {r.kld_median:.5f} | {r.kld_p99:.4f} | {r.top1:.4f} |")
    lines += ["", f"![mean KLD vs bits per weight]({png.name})", "",
              f"## Where the bits matter: one class at a time ({meta['class_type']}, with imatrix; the rest F32)", "",
              "| class quantized alone | size (MiB) | mean KLD | top-1 agreement |", "|---|---|---|---|"]
    for r in rows:
        if r.kind == "class":
            lines.append(f"| {r.name} | {r.bytes / 2**20:.2f} | {r.kld_mean:.5f} | {r.top1:.4f} |")
    lines += ["", "Raw rows: `" + path.with_suffix(".json").name + "`.", ""]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    raw = path.with_suffix(".json")
    raw.with_name(raw.name + ".tmp").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    os.replace(raw.with_name(raw.name + ".tmp"), raw)


def plot_kld_vs_bpw(path: Path, rows: list[Row]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed (pip install 'herd[report]'): no plot", stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    styles = {("llama.cpp mix", False): ("o", "tab:blue"), ("llama.cpp mix", True): ("o", "tab:cyan"),
              ("dynamic", False): ("s", "tab:red"), ("dynamic", True): ("s", "tab:orange"),
              ("auto", True): ("^", "tab:green")}
    for (kind, imx), (marker, color) in styles.items():
        pts = [r for r in rows if r.kind == kind and r.imatrix == imx]
        if pts:
            ax.scatter([r.bpw for r in pts], [r.kld_mean for r in pts], marker=marker, color=color,
                       label=f"{kind}{' + imatrix' if imx else ''}")
            for r in pts:
                ax.annotate(r.name.replace(" size", ""), (r.bpw, r.kld_mean), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor data)")
    ax.set_ylabel("mean KL divergence from F32")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..train.plot import save_png

    return save_png(fig, path)


__all__ = ["run_report", "REPORT_PRESETS", "Row"]

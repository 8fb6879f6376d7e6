"""Auto allocation: choose a type per tensor group to minimise the expected KL divergence under a size budget.

1. Sensitivity: for every group (per layer: attention, routed experts gate+up, routed experts down, shared
   expert; plus the embeddings and the output head) and every candidate type, quantize *that group alone*
   in memory (with the imatrix when given), run the calibration chunks, and record the mean KL divergence
   from the unquantized model. One base pass serves every measurement.
2. Allocation: treat the model's KLD as the sum of the groups' KLDs (a first-order model: small errors in
   different places add up) and solve the multiple-choice knapsack "minimise Σ KLD_g(t_g) subject to
   Σ bytes_g(t_g) <= budget" greedily along each group's lower convex hull: start every group at its
   cheapest type and repeatedly take the upgrade with the largest KLD reduction per extra byte that fits.
   On the convex hulls this greedy is the Lagrangian optimum up to the last, partly fitting step.
The table of measurements is cached as JSON so repeated allocations (other budgets) cost nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import HerdError
from ..weights.gguf_write import tensor_plan
from . import formats
from .plan import is_fixed, tensor_group

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def group_key(canonical: str) -> str:
    """Allocation group: "embeddings", "output", or "blk.N.<class>"."""
    group = tensor_group(canonical)
    if canonical.startswith("model.layers."):
        layer = canonical.split(".")[2]
        return f"blk.{layer}.{group}"
    return group


def groups(config) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    out: dict[str, list] = {}
    for name, shape in tensor_plan(config):
        if not is_fixed(name, shape):
            out.setdefault(group_key(name), []).append((name, tuple(shape)))
    return out


def group_bytes(members, qtype: str) -> int:
    f = formats.format_of(qtype)
    return sum(formats.bytes_for(f.qtype, math.prod(s)) if s[-1] % f.block_size == 0 else 2 * math.prod(s)
               for _, s in members)


def _swap(model, name: str, value):
    from ..model.layers import set_weight
    from ..weights.loader import _owner

    module, leaf = _owner(model, name)
    old = getattr(module, leaf)
    module.__dict__.pop(leaf, None)  # a quantized weight sits in __dict__; a Parameter must not
    set_weight(module, leaf, value)
    return old


def measure_sensitivity(llm, chunks, imatrix=None, candidates=CANDIDATES, progress: bool = True,
                        cache: str | Path | None = None) -> dict[str, dict[str, float]]:
    """{group: {type: mean KLD when only that group is quantized to type}} (cached in `cache` if given)."""
    from tqdm import tqdm

    from ..eval.kld import base_run, compare
    from ..weights.loader import _owner
    from .qtensor import QTensor

    key = {"chunks": len(chunks), "ctx": len(chunks[0]), "first": chunks[0][:16], "imatrix": bool(imatrix),
           "candidates": list(candidates)}
    if cache and Path(cache).is_file():
        saved = json.loads(Path(cache).read_text())
        if saved.get("key") == key:
            return saved["kld"]
    importance = imatrix.importance() if imatrix is not None else {}
    table = groups(llm.config)
    base = base_run(llm, chunks, progress=False)
    result: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(table) * len(candidates), desc="sensitivity", unit="trial", disable=not progress)
    for g, members in table.items():
        result[g] = {}
        for qtype in candidates:
            block = formats.format_of(qtype).block_size
            originals = {}
            try:
                for name, shape in members:
                    if shape[-1] % block:
                        continue
                    module, leaf = _owner(llm.model, name)
                    w = getattr(module, leaf)
                    dense = w.dequantize() if hasattr(w, "dequantize") else w.detach()
                    originals[name] = _swap(llm.model, name, QTensor.quantize(dense.float(), qtype, importance.get(name)))
                result[g][qtype] = compare(llm, base, progress=False)["kld_mean"]
            finally:
                for name, w in originals.items():
                    _swap(llm.model, name, w)
            bar.update(1)
    bar.close()
    if cache:
        tmp = Path(str(cache) + ".tmp")
        tmp.write_text(json.dumps({"key": key, "kld": result}, indent=1))
        os.replace(tmp, cache)
    return result


def allocate(config, sensitivity: dict[str, dict[str, float]], budget_bytes: int,
             fixed_bytes: int = 0) -> dict[str, str]:
    """canonical name -> type for every quantizable tensor, within `budget_bytes` of tensor data (the
    unquantized tensors' `fixed_bytes` count against it)."""
    table = groups(config)
    options: dict[str, list[tuple[int, float, str]]] = {}
    for g, members in table.items():
        pts = sorted((group_bytes(members, q), k, q) for q, k in sensitivity[g].items())
        hull: list[tuple[int, float, str]] = []
        for p in pts:  # keep the lower convex hull of (bytes, kld): dominated / non-convex points never win
            if hull and p[1] >= hull[-1][1]:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], p):
                hull.pop()
            hull.append(p)
        options[g] = hull
    choice = {g: 0 for g in options}
    used = fixed_bytes + sum(options[g][0][0] for g in options)
    if used > budget_bytes:
        raise HerdError(f"--target-size: {budget_bytes:,} bytes cannot hold the model even at its smallest "
                        f"types ({used:,} bytes)")
    while True:
        best, best_gain = None, 0.0
        for g, hull in options.items():
            i = choice[g]
            if i + 1 < len(hull):
                extra = hull[i + 1][0] - hull[i][0]
                gain = (hull[i][1] - hull[i + 1][1]) / max(extra, 1)
                if used + extra <= budget_bytes and gain > best_gain:
                    best, best_gain = g, gain
        if best is None:
            break
        used += options[best][choice[best] + 1][0] - options[best][choice[best]][0]
        choice[best] += 1
    return {name: options[g][choice[g]][2] for g, members in table.items() for name, _ in members}


def _slope(a, b) -> float:
    return (b[1] - a[1]) / max(b[0] - a[0], 1)


def fixed_bytes(config) -> int:
    """Bytes of the tensors that stay F32 (norms, router, 1-D) plus llama3 rope factors."""
    total = sum(4 * math.prod(s) for n, s in tensor_plan(config) if is_fixed(n, s))
    return total + 4 * config.head_dim // 2


def predicted_kld(sensitivity, types: dict[str, str]) -> float:
    """The allocation model's KLD for a type assignment (sum over groups of their measured KLD)."""
    per_group: dict[str, str] = {}
    for name, q in types.items():
        per_group.setdefault(group_key(name), q)
    return sum(sensitivity[g].get(q, float("nan")) for g, q in per_group.items() if g in sensitivity)


__all__ = ["CANDIDATES", "measure_sensitivity", "allocate", "groups", "group_key", "fixed_bytes", "predicted_kld"]

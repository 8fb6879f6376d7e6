"""One compiled graph per decode step (batch 1, one new token).

At one token per step the matmuls are a fraction of the time: each layer also runs ~60 small eager ops
(norms, RoPE, masks, KV stores, residuals, routing), each costing microseconds of dispatch. ``torch.compile``
fuses those into a few generated C++ loops.

Dense bfloat16 weights are multiplied by the graph itself (``_gemv``: one streaming loop per product, no
per-call cost, the routed expert's rows read by index), and one query's attention is the graph's own
float32 loops (``_one_query_attention``); both beat the library calls they replace at one row (figures at
``GRAPH_GEMV`` and ``_gemv``). Every other weight stays opaque to the compiler: quantized ones run through
the same code as in eager mode (``layers.linears``, ``Experts.run_expert``), called from the graph as a
custom op that names the module by a number (inductor cannot lower oneDNN's prepacked weights), and the
routed expert is picked inside the op from the router's output, so the graph does not depend on which
expert a token chose.

Off by default; ``compile_decode(model)`` (``herd run/serve/bench --compile``, ``HERD_COMPILE=1``) turns it
on. Steps it does not cover (several rows or tokens, hooks, adapters, training) run eagerly as before.
"""

from __future__ import annotations

import functools
import itertools
import math
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Linear, linear, linears
from ..switches import env_switch

_CALLS: dict[int, Callable[..., Any]] = {}  # handle -> what the custom ops run eagerly
_OUT: dict[int, list[int]] = {}  # handle -> output widths (for the ops' shapes while tracing)
_CODES: dict[int, list[torch.Tensor]] = {}  # handle -> int8 codes [K, N] (one per expert) for herd::int_mm


_HANDLES = itertools.count()  # never reused: a released step's numbers must not name another step's ops


def _register(fn: Callable[..., Any] | None, widths: list[int], codes: list[torch.Tensor] | None = None) -> int:
    handle = next(_HANDLES)
    if fn is not None:
        _CALLS[handle] = fn
    if codes is not None:
        _CODES[handle] = codes
    _OUT[handle] = widths
    return handle


# Declared with torch.library.Library rather than torch.library.custom_op: the latter's Python wrapper
# (alias checks, autograd plumbing) cost ~100 us per call, more than the ops it saves.
_LIB = torch.library.Library("herd", "DEF")
_LIB.define("matmuls(Tensor x, int handle) -> Tensor")
_LIB.define("expert(Tensor x, Tensor expert_ids, int handle) -> Tensor")
_LIB.define("int_mm(Tensor xq, Tensor expert_ids, int handle) -> Tensor")


def _matmuls(x: torch.Tensor, handle: int) -> torch.Tensor:
    """The outputs of one or more matmuls reading x, side by side in the last dimension (the graph splits
    them: an op's outputs may not be views of each other)."""
    return _CALLS[handle](x)


def _expert(x: torch.Tensor, expert_ids: torch.Tensor, handle: int) -> torch.Tensor:
    return _CALLS[handle](x, int(expert_ids.reshape(-1)[0]))


def _int_mm(xq: torch.Tensor, expert_ids: torch.Tensor, handle: int) -> torch.Tensor:
    """int8 rows [M, K] times one int8 matrix (a dense one, or the expert `expert_ids` picks) -> int32 [M, N]:
    the product alone, ~3 us beyond streaming the codes; the graph quantizes the input and applies the
    scales around it, fused with the ops before and after."""
    codes = _CODES[handle]
    return torch._int_mm(xq, codes[int(expert_ids.reshape(-1)[0])] if len(codes) > 1 else codes[0])


_LIB.impl("matmuls", _matmuls, "CPU")
_LIB.impl("expert", _expert, "CPU")
_LIB.impl("int_mm", _int_mm, "CPU")


@torch.library.register_fake("herd::matmuls")
def _(x, handle):
    return x.new_empty(*x.shape[:-1], sum(_OUT[handle]))


@torch.library.register_fake("herd::expert")
def _(x, expert_ids, handle):
    return x.new_empty(*x.shape[:-1], _OUT[handle][0])


@torch.library.register_fake("herd::int_mm")
def _(xq, expert_ids, handle):
    return xq.new_empty(xq.shape[0], sum(_OUT[handle]), dtype=torch.int32)


class _Matmuls:
    """One matmul call of the graph: one or more weights reading the same input, outputs side by side.
    With `dense` (bfloat16 weights, the parts' rows stacked) the graph computes the product itself
    (``_gemv``); with `scale` (int8 weights, ``VnniWeight``) it quantizes the input and applies the scales
    itself and calls herd::int_mm for the integer product alone; otherwise herd::matmuls runs the eager form."""

    def __init__(self, fn, widths: list[int], scale: torch.Tensor | None = None, codes: list[torch.Tensor] | None = None,
                 dense: torch.Tensor | None = None, kquant: list[int] | None = None):
        self.widths, self.scale, self.dense, self.kquant = widths, scale, dense, kquant
        self.handle = _register(fn, widths, codes)


def _int8_linear(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """``VnniWeight.linear`` in the graph, with its own pieces (so the same bits): x's rows to int8 with one
    scale each (``quantize_rows``), the integer product (`product`: a herd::int_mm call), ``rescale``."""
    from ..quant.kernels import quantize_rows, rescale

    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]), keepdim=True)
    y = rescale(product(xq), xs, scale, x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (one row) times a bfloat16 w [N, K] (or [1, N, K]: an expert picked by index) -> [..., N]:
    each output a float32 dot product of the bfloat16 values, rounded once to x's dtype, as oneDNN's bf16
    matmul computes it (up to the order of the float32 sum). Written as the product and sum it is, inductor
    makes one loop of it that streams w at ~93% of a float32 sum's rate on the bench machines; oneDNN's
    call costs ~15-24 us beyond its streaming and runs the 202k-row head at ~70% (benchmarks/RESULTS.md)."""
    # x goes to memory first: inductor would otherwise inline the ops producing it (norms, SwiGLU, an
    # embedding lookup) into the loop, recomputing them for every one of w's rows
    row = torch.ops.prims.inductor_force_stride_order(x.reshape(-1), (1,))
    y = (w.float() * row.float()).sum(-1)
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[-2])


def _kquant(x: torch.Tensor, handles: list[int], expert: torch.Tensor) -> torch.Tensor:
    """Products by herd's K-quant kernels (``quant.native``: one op per packed matrix, the input quantized
    inside it), side by side, in x's dtype."""
    from ..quant.native import product

    x2 = x.reshape(-1, x.shape[-1])
    ys = [product(x2, h, expert) for h in handles]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def _mm(x: torch.Tensor, m: _Matmuls) -> list[torch.Tensor]:
    if m.kquant is not None:
        y = _kquant(x, m.kquant, _NO_EXPERT)
    elif m.dense is not None:
        y = _gemv(x, m.dense)
    elif m.scale is None:
        y = torch.ops.herd.matmuls(x, m.handle)
    else:
        y = _int8_linear(x, lambda xq: torch.ops.herd.int_mm(xq, _NO_EXPERT, m.handle), m.scale)
    return list(y.split(m.widths, dim=-1))


_NO_EXPERT = torch.zeros(1, dtype=torch.long)  # herd::int_mm's expert argument for a dense matrix

# bfloat16 weights multiplied in the graph (``_gemv``) rather than by oneDNN calls (measured on the BF16
# bench model, AVX-512 BF16, 2 threads, one process: 18.8 vs 26.4 ms per step); HERD_GRAPH_GEMV=0 keeps the
# oneDNN calls. With it, the compiled step keeps one row-major copy of those weights, which eager calls
# share (``PackedBF16.use_plain``)
GRAPH_GEMV = env_switch("HERD_GRAPH_GEMV", True)


def _stacked(weights: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The weights concatenated along `dim` (rows of [N, K] matrices, or of each expert of [E, N, K] stacks)
    into a row-major bfloat16 copy on 2 MiB pages, which the graph streams."""
    from ..quant.kernels import huge_empty, release_pages

    shape = list(weights[0].shape)
    shape[dim] = sum(w.shape[dim] for w in weights)
    out = torch.cat([w.detach() for w in weights], dim=dim, out=huge_empty(tuple(shape), torch.bfloat16))
    for w in weights:
        release_pages(w)  # a memory-mapped (GGUF) weight's pages, read again for the copy
    return out


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated pairwise by rot [B, T, D/2, 2] (cos, sin): the complex product written out."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    c, s = rot[:, :, None, :, 0], rot[:, :, None, :, 1]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(3).to(x.dtype)


def _plain_int8(form) -> bool:
    """Whether a repacked form is int8 codes the graph can multiply through herd::int_mm (not prepacked for
    oneDNN, not so tall that eager mode splits the product)."""
    from ..quant.kernels import CHUNK_ROWS, VnniWeight

    return isinstance(form, VnniWeight) and form.codes is not None and form.shape[0] <= CHUNK_ROWS


def _matmuls(modules: list[nn.Module], dtype: torch.dtype) -> _Matmuls:
    """The graph's call of `modules` (Linear layers reading one x) through the form eager mode uses for them
    (``layers.linears``), looked up once here instead of on every call."""
    from ..quant.kernels import PackedBF16
    from ..quant.native import KQuantWeight
    from ..quant.qtensor import QTensor

    widths = [m.out_features if isinstance(m, Linear) else m.weight.shape[0] for m in modules]
    packs = [m.__dict__.get("_packed", {}).get("weight") for m in modules]
    weights = [m.weight for m in modules]
    if dtype == torch.bfloat16 and all(p is not None for p in packs) and GRAPH_GEMV:
        dense = _stacked([p.weight for p in packs])
        PackedBF16.use_plain(packs, dense)  # eager calls (several rows) read the same copy
        return _Matmuls(None, widths, dense=dense)
    if dtype == torch.bfloat16 and all(p is not None for p in packs):
        matrix = PackedBF16.fused_form(packs)._packed[0] if len(packs) > 1 else packs[0]._matrix(0)
        return _Matmuls(lambda x: torch.ops.mkldnn._linear_pointwise(x, matrix, None, "none", [], ""), widths)
    if all(isinstance(w, QTensor) for w in weights) and not any(p is not None for p in packs):
        form = QTensor.fused_form(weights) if len(weights) > 1 else weights[0]._repacked(0) if weights[0]._fast_path else None
        own = [w._repacked(0) if w._fast_path else None for w in weights]
        if isinstance(form, KQuantWeight):
            return _Matmuls(None, widths, kquant=[form.handle])
        if form is None and all(isinstance(f, KQuantWeight) for f in own):  # parts of different types
            return _Matmuls(None, widths, kquant=[f.handle for f in own])
        if _plain_int8(form):
            return _Matmuls(None, widths, form.scale, [form._codes_t])
        if form is not None:
            return _Matmuls(form.linear, widths)
    if len(modules) == 1:
        if isinstance(modules[0], Linear):
            return _Matmuls(modules[0], widths)
        return _Matmuls(lambda x, w=modules[0].weight: linear(x, w), widths)  # a router: its weight as it is
    return _Matmuls(lambda x: torch.cat(linears(x, modules), dim=-1), widths)


class _Routed:
    """The graph's call of the routed expert, picked inside the op from the router's choice: int8 experts as
    ``_Matmuls`` does (herd::int_mm on the chosen expert's codes, its scales indexed in the graph), any
    other form as one herd::expert op running the forms ``Experts.run_expert`` uses, looked up once."""

    def __init__(self, experts: nn.Module, dtype: torch.dtype):
        from ..quant.kernels import PackedBF16
        from ..quant.native import KQuantWeight
        from ..quant.qtensor import QTensor

        n, hidden = experts.num_experts, experts.down_proj.shape[1]
        self.width = experts.gate_proj.shape[1]
        self.int8 = False
        self.kquant_gate_up = None
        packed = experts.__dict__.get("_packed")
        self.gate_up_dense = None
        if dtype == torch.bfloat16 and packed is not None and len(packed) == 3 and GRAPH_GEMV:
            gate_up, down = [packed["gate_proj"], packed["up_proj"]], packed["down_proj"]
            self.gate_up_dense = _stacked([p.weight for p in gate_up], dim=1)
            self.down_dense = _stacked([down.weight])
            for e in range(n):  # eager calls (prefill's token groups) read the same copies
                PackedBF16.use_plain(gate_up, self.gate_up_dense[e], e)
                PackedBF16.use_plain([down], self.down_dense[e], e)
            return
        if dtype == torch.bfloat16 and packed is not None and len(packed) == 3:
            gu = [PackedBF16.fused_form([packed["gate_proj"], packed["up_proj"]], e)._packed[0] for e in range(n)]
            down = [packed["down_proj"]._matrix(e) for e in range(n)]
            op, width = torch.ops.mkldnn._linear_pointwise, self.width

            def run_packed(x, e):
                g, u = op(x, gu[e], None, "none", [], "").split(width, dim=-1)
                return op(F.silu(g).mul_(u), down[e], None, "none", [], "")

            self.handle = _register(run_packed, [hidden])
            return
        stacks = [experts.gate_proj, experts.up_proj, experts.down_proj]
        if packed is None and all(isinstance(w, QTensor) and w._fast_path for w in stacks):
            gu = [QTensor.fused_form(stacks[:2], e) for e in range(n)]
            down = [stacks[2]._repacked(e) for e in range(n)]
            if all(isinstance(f, KQuantWeight) for f in gu + down) and len({f.qtype for f in gu}) == 1:
                from ..quant.native import register

                self.kquant_gate_up = register([f.blob for f in gu], gu[0].qtype, gu[0].shape)
                self.kquant_down = register([f.blob for f in down], down[0].qtype, down[0].shape)
                return
            if all(_plain_int8(f) for f in gu + down):
                self.int8 = True
                self.gate_up = _register(None, [2 * self.width], [f._codes_t for f in gu])
                self.down = _register(None, [hidden], [f._codes_t for f in down])
                # [E, N] copies of the experts' row scales (small next to the codes), for indexing in the graph
                self.gate_up_scale = torch.stack([f.scale for f in gu])
                self.down_scale = torch.stack([f.scale for f in down])
                return
        self.handle = _register(lambda x, e: experts.run_expert(e, x), [hidden])


def _routed(r: _Routed, x: torch.Tensor, top_id: torch.Tensor) -> torch.Tensor:
    if r.gate_up_dense is not None:  # the chosen expert's rows, read by index inside the product's loop
        ids = top_id.reshape(-1)
        g, u = _gemv(x, r.gate_up_dense[ids]).split(r.width, dim=-1)
        return _gemv(F.silu(g).mul_(u), r.down_dense[ids])
    if r.kquant_gate_up is not None:
        g, u = _kquant(x, [r.kquant_gate_up], top_id).split(r.width, dim=-1)
        return _kquant(F.silu(g).mul_(u), [r.kquant_down], top_id)
    if not r.int8:
        return torch.ops.herd.expert(x, top_id, r.handle)
    ids = top_id.reshape(-1)
    gu = _int8_linear(x, lambda xq: torch.ops.herd.int_mm(xq, top_id, r.gate_up), r.gate_up_scale[ids])
    g, u = gu.split(r.width, dim=-1)
    return _int8_linear(F.silu(g).mul_(u), lambda xq: torch.ops.herd.int_mm(xq, top_id, r.down), r.down_scale[ids])


class _LayerPlan:
    """What the graph needs of one decoder layer: norm weights, flags, and the handles of its matmuls."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        attn = self.attn = layer.self_attn
        self.graph_attention = GRAPH_ATTENTION
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.cache_limit = attn.chunk  # chunked layers keep a ring of `chunk` slots (runtime.cache)
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv = _matmuls(qkv, dtype)
        self.o = _matmuls([attn.o_proj], dtype)
        ff = layer.feed_forward
        self.is_moe = layer.is_moe
        if self.is_moe:
            router, experts = ff.router, ff.experts
            self.router = _matmuls([router], dtype)
            self.expert = _Routed(experts, dtype)
            dense = ff.shared_expert
        else:
            dense = ff
        gu = [dense.gate_proj, dense.up_proj]
        self.gate_up = _matmuls(gu, dtype)
        self.down = _matmuls([dense.down_proj], dtype)


# One query's attention as the graph's own loops rather than SDPA: torch's CPU flash attention costs ~7x
# more in bfloat16 than in float32 at one query (measured: 300 vs 45 us over 320 keys, 1.9 vs 0.28 ms over
# 2048), more than the layer's matmuls at long contexts. HERD_GRAPH_ATTENTION=0 keeps SDPA.
GRAPH_ATTENTION = env_switch("HERD_GRAPH_ATTENTION", True)


def _one_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q [B, H, 1, D] over a cache k, v [B, KV, S, D] (H a multiple
    of KV: grouped queries), mask bool [B, 1, 1, S]; in float32, the output rounded once to q's dtype."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.float().view(b, kv, h // kv, 1, d)
    scores = (qg * k.float()[:, :, None]).sum(-1) * scale  # [B, KV, G, S]
    scores = scores.masked_fill(~mask[:, :, None, 0], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights[..., None] * v.float()[:, :, None]).sum(-2)  # [B, KV, G, D]
    return out.view(b, h, 1, d).to(q.dtype)


def _attention(p: _LayerPlan, h, positions, rot, k_cache, v_cache, pos_cache, slots):
    """``Attention.forward`` for one token: store its key/value by slot, attend over the cache buffers."""
    from ..model.attention import attention_mask

    attn = p.attn
    q, k, v = attn.heads(*_mm(h, p.qkv), positions, rot, rope=_rope)
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    pos_cache.index_copy_(1, slots, positions)
    mask = attention_mask(positions, pos_cache, attn.chunk)
    if p.graph_attention:
        out = _one_query_attention(q, k_cache, v_cache, mask, 1 / math.sqrt(attn.head_dim))
    else:
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=attn.n_kv != attn.n_heads,
                                             scale=1 / math.sqrt(attn.head_dim))
    out = out.transpose(1, 2).reshape(*h.shape[:2], attn.n_heads * attn.head_dim)
    return _mm(out, p.o)[0]


def _feed_forward(p: _LayerPlan, h):
    g, u = _mm(h, p.gate_up)
    dense = _mm(F.silu(g) * u, p.down)[0]
    if not p.is_moe:
        return dense
    flat = h.reshape(-1, h.shape[-1])
    logits = _mm(flat, p.router)[0]
    top_val, top_id = torch.topk(logits, 1, dim=-1)
    score = torch.sigmoid(top_val.float()).to(h.dtype)
    routed = _routed(p.expert, flat * score, top_id)
    return (dense.reshape(flat.shape) + routed).view(h.shape)


def _options() -> dict:
    # Round every intermediate to its dtype as eager mode does (inductor otherwise keeps bf16 intermediates
    # in fp32): the compiled step then gives the eager step's logits bit for bit in bf16.
    return {"emulate_precision_casts": True}


def _embeds_in_graph(embed: nn.Module) -> bool:
    from ..quant import formats

    w = embed.weight
    return isinstance(w, torch.Tensor) or w.qtype in formats._DECODERS


def _embed(embed: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``embed(ids)`` as traceable ops: a quantized table's rows go through the same block decoder as
    ``QTensor.take_rows`` (~70 small ops eagerly, ~0.2 ms per step; one fused loop here), minus its checks."""
    from ..quant import formats

    w = embed.weight
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    rows = w.data[ids.reshape(-1)].reshape(-1, w.format.type_size)
    return formats._DECODERS[w.qtype](rows).reshape(*ids.shape, w.shape[-1]).to(embed.dtype)


_WEIGHT_NAMES = ("weight", "gate_proj", "up_proj", "down_proj")


def _weights_of(module: nn.Module) -> list[tuple[str, Any]]:
    """(name, object) of the weights a module holds directly: parameters or quantized weight objects."""
    return [(n, module._parameters[n] if n in module._parameters else module.__dict__[n])
            for n in _WEIGHT_NAMES if n in module._parameters or n in module.__dict__]


class DecodeStep:
    """The compiled one-token step of one Llama4TextModel (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        dtype = model.model.embed_tokens.dtype  # the activations' (and the KV cache's)
        before = set(_OUT)
        self.plans = [_LayerPlan(layer, dtype) for layer in model.model.layers]
        self.head = _matmuls([model.lm_head], dtype)
        self._handles = sorted(set(_OUT) - before)
        # what the graph and its matmul forms assume, checked on every call: the same modules (no adapter
        # swapped in), no hooks (observers must see eager calls), the same weight objects
        self._watched = [(parent._modules, name, child, child._forward_hooks, child._forward_pre_hooks,
                          child._parameters, child.__dict__, _weights_of(child))
                         for parent in model.modules() for name, child in parent._modules.items()]
        self.embed_in_graph = _embeds_in_graph(model.model.embed_tokens)
        self._moe = [layer.feed_forward for layer in model.model.layers if layer.is_moe]
        # A fresh code object per step: dynamo keys its cache (and its limit of recompiles) on the code object,
        # so each model gets its own graph instead of counting as a recompile of another model's.
        graph = types.FunctionType(DecodeStep._graph.__code__.replace(), globals(), "decode_step")
        self._fn = torch.compile(functools.partial(graph, self), fullgraph=True, dynamic=False, options=_options())

    def release(self) -> None:
        """Forget this step's matmul forms (the model then decodes eagerly)."""
        for h in self._handles:
            _CALLS.pop(h, None)
            _CODES.pop(h, None)
            _OUT.pop(h, None)
        from ..quant.native import unregister

        for p in self.plans:  # the routed experts' K-quant handles (one matrix per expert, held in C++)
            if p.is_moe and p.expert.kquant_gate_up is not None:
                unregister(p.expert.kquant_gate_up)
                unregister(p.expert.kquant_down)
                p.expert.kquant_gate_up = None
        self.model.__dict__.pop("_decode_step", None)

    def _graph(self, input_ids, positions, rot, k_caches, v_caches, pos_caches):
        x = _embed(self.model.model.embed_tokens, input_ids) if self.embed_in_graph else input_ids
        for i, p in enumerate(self.plans):
            h = p.in_norm(x)
            slots = positions[0] % p.cache_limit if p.cache_limit is not None else positions[0]
            x = x + _attention(p, h, positions, rot, k_caches[i], v_caches[i], pos_caches[i], slots)
            x = x + _feed_forward(p, p.post_norm(x))
        return _mm(self.model.model.norm(x), self.head)[0]

    def covers(self, input_ids, cache, positions, inputs_embeds) -> bool:
        """Whether this forward call is a step the graph computes as the eager forward would: one row, one
        token id, a cache already holding the prompt, on the CPU, fast kernels on, no autograd, nothing
        changed or observed since compiling."""
        from ..quant import kernels

        if inputs_embeds is not None or positions is not None or cache is None or input_ids is None:
            return False
        if input_ids.shape != (1, 1) or input_ids.device.type != "cpu" or not kernels.enabled() or torch.is_grad_enabled():
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        for siblings, name, child, hooks, pre_hooks, params, attrs, weights in self._watched:
            if siblings.get(name) is not child or hooks or pre_hooks:
                return False
            for attr, w in weights:
                if (params[attr] if attr in params else attrs.get(attr)) is not w:
                    return False
        if any(m.route_hook is not None or m.logits_hook is not None for m in self._moe):
            return False
        return len(cache.layers) == len(self.plans) and bool(cache.seq_lens[0] > 0)

    def __call__(self, input_ids, cache) -> torch.Tensor:
        model = self.model
        positions = cache.next_positions(1)
        pos = int(positions[0, 0])
        rot = torch.view_as_real(model.model.rotary_emb(positions))  # the cos/sin eager RoPE uses
        for plan, layer in zip(self.plans, cache.layers):
            if layer.limit != plan.cache_limit:
                raise ValueError(f"layer cache limit {layer.limit} != {plan.cache_limit}: a cache of another model")
            layer._grow(pos + 1)
        ks, vs, ps = [c.k for c in cache.layers], [c.v for c in cache.layers], [c.pos for c in cache.layers]
        for t in ks + vs:  # the cache grows: its length is a symbol of the graph, not a constant
            torch._dynamo.maybe_mark_dynamic(t, 2)
        for t in ps:
            torch._dynamo.maybe_mark_dynamic(t, 1)
        tokens = input_ids if self.embed_in_graph else model.embed(input_ids)
        logits = self._fn(tokens, positions, rot, ks, vs, ps)
        cache.advance(1)
        return logits


def compile_decode(model: nn.Module) -> DecodeStep:
    """Attach a compiled one-token decode step to `model` (a Llama4TextModel): its forward then runs every
    batch-1, one-token cached step the graph covers through it (compiled on the first such step). Call
    after the model's weights and paths are final; ``release_decode`` detaches it."""
    from ..quant.kernels import building_weights, select_paths

    release_decode(model)
    with building_weights():
        # every repacked and fused form exists before it is captured; bf16 weights the graph multiplies itself
        # get their plain copies from the step, not oneDNN layouts first
        select_paths(model, eager=True, progress=True, pack_bf16=not GRAPH_GEMV)
        step = DecodeStep(model)
    model.__dict__["_decode_step"] = step
    return step


def release_decode(model: nn.Module) -> None:
    step = model.__dict__.get("_decode_step")
    if step is not None:
        step.release()


def wanted() -> bool:
    """``HERD_COMPILE=1`` asks for compiled decoding wherever herd loads a model (as ``--compile`` does)."""
    return env_switch("HERD_COMPILE", False)

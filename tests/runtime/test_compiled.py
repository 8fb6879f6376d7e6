"""The compiled decode step (herd.runtime.compiled) against the eager forward it replaces: in float32
within float32 rounding (quantized weights: the same kernels run the matmuls); in bfloat16, where the
graph computes dense products and the one-query attention itself in float32 (eager mode: oneDNN, and
SDPA's bf16 kernel), within bfloat16 rounding of those; each of the graph's own pieces against a float64
reference; and the eager forward wherever the step does not apply (hooks, several rows, exact mode,
weights swapped after compiling).
Both modes decode the same tokens (teacher forcing): a last-bit difference can otherwise flip a near-tie
of a random model's greedy pick and compare two different continuations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.quant import kernels
from herd.runtime.compiled import compile_decode, release_decode

# chunked layers whose ring (8 slots) wraps within the test, a NoPE layer with temperature tuning whose
# cache grows past its first capacity (16), dense and MoE layers interleaved, QK norm
FEATURES = dict(num_hidden_layers=4, attention_chunk_size=8, floor_scale=4, interleave_moe_layer_step=2)
STEPS = 30


def _decode(model, prompt: torch.Tensor, steps: int = STEPS, rows: int = 1, tokens=None, fed=None) -> torch.Tensor:
    """Logits [steps, V] of decoding after `prompt` (eager prefill), one cached step at a time: each step's
    token is the previous logits' greedy pick, or `tokens[i]` where given; the tokens go to list `fed`."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(rows)
        logits = model(prompt.expand(rows, -1), cache=cache, last_only=True)[:, -1]
        for i in range(steps):
            token = logits.float().argmax(-1, keepdim=True) if tokens is None else tokens[i].expand(rows, 1)
            if fed is not None:
                fed.append(token[:1])
            logits = model(token, cache=cache, last_only=True)[:, -1]
            out.append(logits[0])
    return torch.stack(out)


def _counting(step):
    """Count the calls that reach the compiled graph."""
    calls = {"n": 0}
    fn = step._fn

    def counted(*args):
        calls["n"] += 1
        return fn(*args)

    step._fn = counted
    return calls


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from builders import random_hf_model, tiny_text_config

    path = tmp_path_factory.mktemp("compiled") / "hf"
    random_hf_model(tiny_text_config(**FEATURES), seed=5).save_pretrained(path)
    return path


PROMPT = torch.tensor([[0, 17, 93, 5, 250]])


@pytest.fixture(scope="module")
def bf16_pair(tiny_dir):
    """(eager logits, the tokens they fed, the bf16 model with its compiled step attached, the step's call
    counter)."""
    llm = herd.load(tiny_dir, dtype="bf16")
    fed = []
    want = _decode(llm.model, PROMPT, fed=fed)
    step = compile_decode(llm.model)
    return want, fed, llm.model, _counting(step)


def test_bf16_steps_match_eager(bf16_pair):
    """Dense bf16 products in the graph: float32 sums in another order than oneDNN's, each rounded once to
    bfloat16, so a product may differ in its last bit (1/128 relative) and the logits by a few of those."""
    from torch._dynamo.utils import counters

    want, fed, model, calls = bf16_pair
    step = model.__dict__["_decode_step"]
    if kernels.has_bf16_dot():  # the graph multiplies every dense weight itself
        assert all(g.dense is not None for p in step.plans for g in (p.qkv, p.o, p.gate_up, p.down, step.head))
        assert all(p.expert.gate_up_dense is not None for p in step.plans if p.is_moe)
    graphs = counters["stats"]["unique_graphs"]
    got = _decode(model, PROMPT, tokens=fed)
    assert calls["n"] == STEPS  # every decode step ran compiled; the prefill did not
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph: the growing cache did not recompile
    scale = want.float().abs().amax(-1, keepdim=True)
    assert ((got.float() - want.float()).abs() <= 0.03 * scale).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_attention_matches_exact_attention(dtype):
    """``_one_query_attention`` (the graph's attention for one query over the cache) against float64 SDPA:
    grouped queries (8 heads over 2 key/value heads), a mask hiding unfilled and out-of-chunk slots."""
    from herd.runtime.compiled import _one_query_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, s, 64, generator=g).to(dtype) for h, s in ((8, 1), (2, 37), (2, 37)))
    mask = torch.rand(1, 1, 1, 37, generator=g) > 0.3
    mask[..., 5] = True
    got = torch.compile(_one_query_attention, fullgraph=True)(q, k, v, mask, 0.125)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.125, enable_gqa=True)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5  # one rounding of each output to bf16
    assert ((got.double() - exact).abs() <= tol * exact.abs().amax()).all()


def test_graph_gemv_is_one_rounding_of_the_exact_product():
    """``_gemv`` (the graph's bf16 product) against the float64 product of the same bf16 values: within
    half a bf16 step plus float32 accumulation error, for a plain matrix and an expert picked by index."""
    from herd.runtime.compiled import _gemv

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 512, generator=g).bfloat16()
    stack = torch.randn(3, 96, 512, generator=g).bfloat16()
    ids = torch.tensor([2])
    gemv = torch.compile(lambda x, w, stack, ids: (_gemv(x, w), _gemv(x, stack[ids])), fullgraph=True)
    got, picked = gemv(x, stack[0], stack, ids)
    for y, w in ((got, stack[0]), (picked, stack[2])):
        exact = w.double() @ x.reshape(-1).double()
        assert y.shape == (1, 1, 96) and y.dtype == torch.bfloat16
        err = (y.reshape(-1).double() - exact).abs()
        assert (err <= exact.abs() * 2**-8 + 1e-4 * exact.abs().max()).all()


def test_float32_steps_match_eager(tiny_dir):
    llm = herd.load(tiny_dir)
    want = _decode(llm.model, PROMPT)
    calls = _counting(compile_decode(llm.model))
    got = _decode(llm.model, PROMPT)
    assert calls["n"] == STEPS
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_quantized_steps_match_eager(quantized_gguf, dtype):
    """Quantized weights run the same repacked kernels in both modes: bf16 activations give the same bits,
    float32 ones agree to float32 rounding (fused element-wise math may round differently)."""
    llm = herd.load(quantized_gguf, dtype=dtype)
    fed = []
    want = _decode(llm.model, PROMPT, fed=fed)
    step = compile_decode(llm.model)
    calls = _counting(step)
    got = _decode(llm.model, PROMPT, tokens=fed)
    assert calls["n"] == STEPS
    if kernels.has_int8_dot():  # int8 weights: the graph quantizes inputs itself around herd::int_mm
        groups = [g for p in step.plans for g in (p.qkv, p.o, p.gate_up, p.down)]
        # (Q4_K / Q6_K weights: herd's own K-quant kernels, which quantize their input themselves)
        assert all(g.scale is not None or g.kquant is not None for g in groups)
        assert all(p.expert.int8 or p.expert.kquant_gate_up is not None for p in step.plans if p.is_moe)
    expert_handles = [h for p in step.plans if p.is_moe and p.expert.kquant_gate_up is not None
                      for h in (p.expert.kquant_gate_up, p.expert.kquant_down)]
    step.release()  # the C++ side lets go of the experts' matrices registered for the step
    for h in expert_handles:
        with pytest.raises(RuntimeError, match="no weight"):
            torch.ops.herd_kquant.mm(torch.zeros(1, 256), torch.zeros(1, dtype=torch.long), h)
    if dtype == "bf16":  # one-query attention in float32 in the graph, SDPA's bf16 kernel in eager mode
        scale = want.float().abs().amax(-1, keepdim=True)
        assert ((got.float() - want.float()).abs() <= 0.05 * scale).all()
        return
    from herd.quant.qtensor import QTensor

    paths = {w._fast_path for m in llm.model.modules() for w in vars(m).values() if isinstance(w, QTensor)}
    # a float32 rounding difference of the fused element-wise math can move an input across a rounding
    # boundary of the kernel's input: bf16 for the int4 kernels (CPUs without VNNI), an int8 code for vnni
    # (measured on an AVX-512 VNNI CPU: one code moved at step 13, logits up to 0.043 off from there on)
    tol = {"vnni": 5e-2, "kquant": 5e-2, "int4": 2e-2, "int4x2": 2e-2}.get(
        next(iter(paths & {"vnni", "kquant", "int4", "int4x2"}), ""), 1e-5)
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    top2 = want.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * tol  # the greedy pick wherever it is not a near-tie
    assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.fixture(scope="module")
def quantized_gguf(tiny_dir, tmp_path_factory):
    """The tiny model with widths 256 (so K-quants apply) as a GGUF mixing Q8_0, Q4_K and Q6_K."""
    import json

    from builders import byte_bpe_tokenizer_json, random_hf_model, tiny_text_config

    from herd.weights.gguf_write import hf_tensor_getter, is_quantizable, tensor_plan, write_gguf

    hf_dir = tmp_path_factory.mktemp("compiled_q") / "hf"
    cfg = tiny_text_config(hidden_size=256, intermediate_size=256, intermediate_size_mlp=256, head_dim=64,
                           vocab_size=512, **FEATURES)
    random_hf_model(cfg, seed=6, std=0.05).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(byte_bpe_tokenizer_json(512)), encoding="utf-8")
    config = herd.load(hf_dir).config
    types = {name: "Q8_0" if "self_attn" in name else ("Q6_K" if "down" in name else "Q4_K")
             for name, shape in tensor_plan(config) if is_quantizable(name, shape)}
    path = hf_dir.parent / "mixed.gguf"
    write_gguf(path, config, hf_tensor_getter(hf_dir, config), hf_dir, qtypes=types, progress=False)
    return path


def test_steps_it_does_not_cover_run_eagerly(bf16_pair):
    want, fed, model, calls = bf16_pair
    before = calls["n"]
    seen = []
    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:  # an observer must see the eager calls
        got = _decode(model, PROMPT, steps=3)
    finally:
        handle.remove()
    assert calls["n"] == before and len(seen) == 4  # prefill + 3 steps, none compiled
    assert torch.equal(got, want[:3])
    with kernels.exact():  # exact dequantization asked for: not the fast kernels the graph calls
        _decode(model, PROMPT, steps=2)
    assert calls["n"] == before
    two_rows = _decode(model, PROMPT, steps=3, rows=2)  # batched decoding (the serving engine)
    assert calls["n"] == before
    assert torch.allclose(two_rows.float(), want[:3].float(), atol=0.1)
    got = _decode(model, PROMPT, steps=3, tokens=fed)  # nothing changed: compiled again
    assert calls["n"] == before + 3
    assert torch.allclose(got.float(), want[:3].float(), atol=0.03 * want.float().abs().max().item())


def test_swapped_weights_and_release(tiny_dir):
    from herd.model.layers import set_weight

    llm = herd.load(tiny_dir, dtype="bf16")
    calls = _counting(compile_decode(llm.model))
    _decode(llm.model, PROMPT, steps=2)
    assert calls["n"] == 2
    o_proj = llm.model.model.layers[0].self_attn.o_proj
    set_weight(o_proj, "weight", torch.zeros_like(o_proj.weight))  # e.g. an adapter merged after compiling
    got = _decode(llm.model, PROMPT, steps=2)
    assert calls["n"] == 2  # the graph's captured weight forms are stale: eager
    fresh = herd.load(tiny_dir, dtype="bf16")
    set_weight(fresh.model.model.layers[0].self_attn.o_proj, "weight", torch.zeros_like(o_proj.weight))
    assert torch.equal(got, _decode(fresh.model, PROMPT, steps=2))
    release_decode(llm.model)
    assert "_decode_step" not in llm.model.__dict__


def test_released_handles_are_never_reused(tiny_dir):
    """A released step's op numbers are not handed out again: another live step keeps its matmuls."""
    from herd.runtime import compiled

    models = [herd.load(tiny_dir, dtype="bf16").model for _ in range(3)]
    first, second = compile_decode(models[0]), compile_decode(models[1])
    kept = {h: compiled._OUT[h] for h in second._handles}
    release_decode(models[0])
    third = compile_decode(models[2])
    assert not set(third._handles) & set(second._handles) and not set(third._handles) & set(first._handles)
    assert kept and all(compiled._OUT[h] is widths for h, widths in kept.items())
    assert not any(h in compiled._OUT or h in compiled._CALLS for h in first._handles)
    release_decode(models[1])
    release_decode(models[2])

"""The compiled decode step (herd.runtime.compiled) against the eager forward it replaces: the same logits
bit for bit in bfloat16 and on quantized weights (the same kernels run the matmuls, and every intermediate
is rounded as eager mode rounds it), within float32 rounding in float32, and the eager forward wherever
the step does not apply (hooks, several rows, exact mode, weights swapped after compiling)."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.quant import kernels
from herd.runtime.compiled import compile_decode, release_decode

# chunked layers whose ring (8 slots) wraps within the test, a NoPE layer with temperature tuning whose
# cache grows past its first capacity (16), dense and MoE layers interleaved, QK norm
FEATURES = dict(num_hidden_layers=4, attention_chunk_size=8, floor_scale=4, interleave_moe_layer_step=2)
STEPS = 30


def _decode(model, prompt: torch.Tensor, steps: int = STEPS, rows: int = 1) -> torch.Tensor:
    """Logits [steps, V] of greedy decoding after `prompt` (eager prefill), one cached step at a time."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(rows)
        logits = model(prompt.expand(rows, -1), cache=cache, last_only=True)[:, -1]
        for _ in range(steps):
            token = logits.float().argmax(-1, keepdim=True)
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
    """(eager logits, the bf16 model with its compiled step attached, the step's call counter)."""
    llm = herd.load(tiny_dir, dtype="bf16")
    want = _decode(llm.model, PROMPT)
    step = compile_decode(llm.model)
    return want, llm.model, _counting(step)


def test_bf16_steps_equal_eager_bit_for_bit(bf16_pair):
    from torch._dynamo.utils import counters

    want, model, calls = bf16_pair
    graphs = counters["stats"]["unique_graphs"]
    got = _decode(model, PROMPT)
    assert calls["n"] == STEPS  # every decode step ran compiled; the prefill did not
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph: the growing cache did not recompile
    assert torch.equal(got, want)


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
    want = _decode(llm.model, PROMPT)
    step = compile_decode(llm.model)
    calls = _counting(step)
    got = _decode(llm.model, PROMPT)
    assert calls["n"] == STEPS
    if kernels.has_int8_dot():  # int8 weights: the graph quantizes inputs itself around herd::int_mm
        groups = [g for p in step.plans for g in (p.qkv, p.o, p.gate_up, p.down)]
        assert all(g.scale is not None for g in groups)
        assert all(p.expert.int8 for p in step.plans if p.is_moe)
    if dtype == "bf16":
        assert torch.equal(got, want)
        return
    from herd.quant.qtensor import QTensor

    paths = {w._fast_path for m in llm.model.modules() for w in vars(m).values() if isinstance(w, QTensor)}
    # the int4 kernels (CPUs without VNNI) take bf16 activations: a float32 rounding difference of the fused
    # element-wise math can move an input across a bf16 rounding boundary
    tol = 2e-2 if paths & {"int4", "int4x2"} else 1e-5
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


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
    want, model, calls = bf16_pair
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
    got = _decode(model, PROMPT, steps=3)  # nothing changed: compiled again
    assert calls["n"] == before + 3 and torch.equal(got, want[:3])


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
    kept = {h: compiled._CALLS[h] for h in second._handles}
    release_decode(models[0])
    third = compile_decode(models[2])
    assert not set(third._handles) & set(second._handles) and not set(third._handles) & set(first._handles)
    assert all(compiled._CALLS[h] is fn for h, fn in kept.items())
    assert not any(h in compiled._CALLS for h in first._handles)
    release_decode(models[1])
    release_decode(models[2])

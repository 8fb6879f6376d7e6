"""Logits parity with transformers' Llama4 (the reference), fp32, across chunk boundaries."""

from __future__ import annotations

import pytest
import torch

import herd

CHUNK = 8
LENGTHS = [1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]

CONFIGS = {
    # Scout-like: every layer MoE, QK-norm, no rope scaling
    "all_moe_qknorm": dict(),
    # Maverick-like: MoE every other layer with dense FFNs between, no QK-norm, llama3 rope scaling with a
    # smooth band (low != high) so every branch of the scaling is exercised
    "interleaved_llama3": dict(
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # two routed experts per token out of eight
    "top2": dict(num_local_experts=8, num_experts_per_tok=2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from builders import random_hf_model, tiny_text_config

    built = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        hf = random_hf_model(tiny_text_config(**overrides), seed=i)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        built[name] = (hf, herd.load(path))
    return built


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(models, name, length):
    hf, llm = models[name]
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = hf(ids).logits
    got = llm.logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_configs_exercise_the_features(models):
    cfg = models["interleaved_llama3"][1].config
    assert cfg.moe_layers == (1, 3) and not cfg.use_qk_norm and cfg.rope_scaling is not None
    assert [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert models["top2"][1].config.num_experts_per_tok == 2


def test_only_selected_experts_run(models):
    """Sparse dispatch: each expert sees exactly the tokens routed to it (never all tokens)."""
    hf, llm = models["all_moe_qknorm"]
    experts = llm.model.model.layers[0].feed_forward.experts
    seen = []
    original = experts.run_expert

    def spy(e, x):
        seen.append((e, x.shape[0]))
        return original(e, x)

    experts.run_expert = spy
    try:
        ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
        llm.logits(ids)
    finally:
        del experts.run_expert
    assert sum(n for _, n in seen) == 12  # top-1: one expert call row per token in total
    assert len({e for e, _ in seen}) == len(seen)  # each selected expert runs once


@pytest.mark.parametrize("batch", [2, 1])  # one row stores by slot copies, several by scatter
def test_cached_decoding_equals_full_forward(models, batch):
    """Prefill, then one token at a time and several at a time, across several chunk boundaries."""
    for name in CONFIGS:
        _, llm = models[name]
        model = llm.model
        length = 4 * CHUNK + 3
        ids = torch.randint(0, llm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            full = model(ids)
            cache = model.new_cache(batch)
            pieces = [model(ids[:, :5], cache=cache)]  # prefill
            pos = 5
            steps = [1, 1, 3, 1, 9, 1, 2]  # one token, several tokens, a block crossing a boundary
            while pos < length:
                n = steps[len(pieces) % len(steps)]
                pieces.append(model(ids[:, pos : pos + n], cache=cache))
                pos += n
        got = torch.cat(pieces, dim=1)
        assert (got - full).abs().max().item() <= 1e-4, name
        # chunked layers never keep more than the chunk
        for i, layer_cache in enumerate(cache.layers):
            if llm.config.is_chunked(i):
                assert layer_cache.capacity <= CHUNK
            else:
                assert layer_cache.capacity >= length


def test_rows_at_different_positions(models):
    """Sequences prefilled alone, then decoded together at different positions (what a serving engine
    does), match each sequence's full forward; dropping a finished row leaves the others intact."""
    _, llm = models["all_moe_qknorm"]
    model = llm.model
    seqs = [
        torch.randint(0, llm.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in (23, 11, 30)
    ]
    prompt_lens = [18, 6, 9]
    with torch.no_grad():
        full = [model(s) for s in seqs]
        batch = model.new_cache(0)
        for s, n in zip(seqs, prompt_lens):
            one = model.new_cache(1)
            model(s[:, :n], cache=one)
            batch.append_rows(one)
        rows = [0, 1, 2]
        pos = list(prompt_lens)
        for step in range(5):
            if step == 3:  # the second sequence finishes and frees its row
                batch.keep_rows([0, 2])
                rows = [0, 2]
            tokens = torch.cat([seqs[r][:, pos[r] : pos[r] + 1] for r in rows])
            out = model(tokens, cache=batch)
            for i, r in enumerate(rows):
                assert (out[i, 0] - full[r][0, pos[r]]).abs().max().item() <= 1e-4, (step, r)
                pos[r] += 1


def test_bf16_runs_and_stays_close(hf_checkpoint):
    hf, path = hf_checkpoint()
    ids = torch.randint(0, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = herd.load(path).logits(ids)
    llm16 = herd.load(path, dtype="bf16")
    assert llm16.model.lm_head.weight.dtype == torch.bfloat16
    got = llm16.logits(ids)
    diff = (got - ref).abs().max().item()
    print(f"bf16 max |dlogits| = {diff:.4f} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 0.1 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9

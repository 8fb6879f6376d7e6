"""herd.train: the loop learns, resumes bit for bit, balances experts, exports loadable checkpoints;
the demo tokenizer round-trips text and keeps Llama 4's special tokens by name."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import herd
from herd.train import (
    IGNORE,
    RandomWindows,
    TrainConfig,
    Trainer,
    encode_chat,
    export_hf,
    fixed_windows,
    load_balancing_loss,
    lr_at,
)
from herd.train.demo import DEMO_SHAPE, build_model, check_demo_shape, demo_config, parameter_split

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and the machine is shared: run this module on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(vocab: int = 64, seed: int = 0, **kw):
    return build_model(demo_config(vocab, bos_token_id=vocab - 2, eos_token_ids=(vocab - 1,), **{**TINY, **kw}), seed=seed)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, warmup_steps=2, max_steps=6, eval_every=0, log_every=1, ckpt_every=0, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class Same:
    """A data source that returns one batch forever."""

    tokens_per_batch = 0

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def random_stream(n: int = 4000, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab - 2, n).astype(np.int32)


def test_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 62, (4, 33))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    trainer = Trainer(tiny_model(), cfg(max_steps=25, lr=1e-2, warmup_steps=3), Same(batch))
    trainer.fit()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[0] > math.log(62) - 0.5
    assert losses[-1] < 0.5 * losses[0]


def test_resume_is_bit_for_bit(tmp_path):
    stream = random_stream()
    run = Trainer(tiny_model(), cfg(ckpt_every=3, keep_checkpoints=3), RandomWindows(stream, 2, 16, seed=1), out_dir=tmp_path / "a")
    run.fit()
    straight = [h["loss"] for h in run.history if "loss" in h]
    assert (tmp_path / "a/checkpoints/step_000003/model.safetensors").is_file()
    assert (tmp_path / "a/checkpoints/latest").read_text().strip() == "step_000006"
    state = torch.load(tmp_path / "a/checkpoints/step_000003/trainer.pt", weights_only=True)
    assert state["step"] == 3

    # a different initial model and data position: everything must come from the checkpoint
    again = Trainer(tiny_model(seed=5), cfg(ckpt_every=3), RandomWindows(stream, 2, 16, seed=9), out_dir=tmp_path / "b")
    again.load_checkpoint(tmp_path / "a/checkpoints/step_000003")
    again.fit()
    resumed = [h["loss"] for h in again.history if "loss" in h]
    assert resumed == straight
    for (name, p), (_, q) in zip(run.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), name
    assert (tmp_path / "b/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    c = cfg(lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, c, 110) == pytest.approx(0.1)
    assert lr_at(9, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.55)
    assert lr_at(110, c, 110) == pytest.approx(0.1)


def test_weight_decay_on_matrices_only():
    trainer = Trainer(tiny_model(), cfg(), Same(None))
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


def test_trainable_selection_is_pluggable():
    model = tiny_model()
    only_router = lambda name, p: name.endswith("router.weight")  # noqa: E731
    trainer = Trainer(model, cfg(), Same(None), trainable=only_router)
    assert {n for n, _ in trainer.params} == {f"model.layers.{i}.feed_forward.router.weight" for i in range(4)}
    assert not model.lm_head.weight.requires_grad


def test_balance_loss_formula_on_a_hand_built_case():
    # 4 tokens, 2 experts, top-1: token 0-2 choose expert 0, token 3 chooses expert 1
    logits = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.5, 0.0], [-1.0, 1.0]], requires_grad=True)
    ids = logits.argmax(-1, keepdim=True)
    s = torch.sigmoid(logits.detach())
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    want = 2 * (0.75 * p[0] + 0.25 * p[1])
    got = load_balancing_loss(logits, ids, 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # uniform routing with equal probabilities gives exactly 1
    flat = torch.zeros(4, 2)
    assert load_balancing_loss(flat, torch.tensor([[0], [1], [0], [1]]), 2).item() == pytest.approx(1.0)
    # its gradient pushes the over-used expert's logit down and the under-used one's up
    got.backward()
    assert logits.grad[:, 0].sum() > 0 > logits.grad[:, 1].sum()


def test_balance_loss_spreads_the_routing():
    """Same data and steps, only the aux coefficient differs: routing gets more even with it."""
    stream = random_stream(vocab=64)
    evals = fixed_windows(stream, 4, 16, max_batches=4)

    def effective(coef: float) -> float:
        model = tiny_model()
        with torch.no_grad():  # start from a router that sends almost everything to expert 0
            for layer in model.model.layers:
                layer.feed_forward.router.weight[0] += 0.5
        t = Trainer(model, cfg(max_steps=20, lr=3e-3, aux_loss_coef=coef), RandomWindows(stream, 4, 16, seed=2), evals)
        t.fit()
        util = t.evaluate()["utilisation"]
        return float(np.mean([math.exp(-sum(x * math.log(x) for x in u if x > 0)) for u in util.values()]))

    assert effective(1.0) > effective(0.0) + 0.1


def test_eval_and_checkpoint_content_is_weights_only(tmp_path):
    stream = random_stream()
    t = Trainer(
        tiny_model(), cfg(max_steps=4, eval_every=2, ckpt_every=2), RandomWindows(stream, 2, 16),
        fixed_windows(stream, 2, 16, max_batches=2), out_dir=tmp_path,
    )
    summary = t.fit()
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 2 * 16
    util = summary["valid"]["utilisation"]
    assert set(util) == {"0", "1", "2", "3"} and all(abs(sum(u) - 1) < 1e-3 for u in util.values())
    torch.load(tmp_path / "checkpoints/step_000004/trainer.pt", weights_only=True)
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]["step"] == 4


# ------------------------------------------------------------------------------- tokenizer + export


def _tokenizer_script():
    spec = importlib.util.spec_from_file_location("train_demo_tokenizer", ROOT / "scripts/train_demo_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. In the beginning God created the heaven and the earth. "
    "def f(x):\n    return x ** 2  # Python 3.11\n\nÉtat, naïve, 東京 — 1234567 tabs\there."
)


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    mod = _tokenizer_script()
    out = tmp_path_factory.mktemp("tok")
    tok = mod.build_tokenizer([TEXT] * 20, vocab=300)
    (out / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(mod.tokenizer_config(300)), encoding="utf-8")
    return out


def test_demo_tokenizer_round_trips_and_keeps_specials(demo_tokenizer):
    from herd.tokenizer import ChatFormat, Tokenizer

    tok = Tokenizer.from_hf_json(demo_tokenizer / "tokenizer.json")
    assert tok.vocab_size == 300 + 128
    for text in (TEXT, "unseen words: zyzzyva ☃ 🦙", "  leading spaces\n\n\nand <|eot|> typed by a user"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < 300  # special-token text stays text
    assert tok.bos_id == 300 and tok.token_id("<|begin_of_text|>") == 300
    assert tok.eos_id == 301 and tok.eot_id == 308 and tok.token_id("<|eom|>") == 307
    assert tok.token_id("<|header_start|>") == 305 and tok.token_id("<|header_end|>") == 306
    assert tok.token_id("<|finetune_right_pad|>") == 318 and tok.token_id("<|patch|>") == 392
    for name in ("<|python_start|>", "<|python_end|>", "<|image|>", "<|reasoning_thinking_start|>"):
        assert 300 <= tok.token_id(name) < 428
    ids = ChatFormat(tok).encode_dialog([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [300, 305] and ids[-1] == tok.encode("\n\n")[-1]


def test_chat_labels_score_only_the_assistant(demo_tokenizer):
    from herd.tokenizer import ChatFormat, Tokenizer

    tok = Tokenizer.from_hf_json(demo_tokenizer / "tokenizer.json")
    msgs = [{"role": "user", "content": "What is a truth?"}, {"role": "assistant", "content": "A good fortune."}]
    ids, labels = encode_chat(msgs, ChatFormat(tok))
    assert ids == ChatFormat(tok).encode_dialog(msgs, add_generation_prompt=False)
    scored = [ids[i + 1] for i, lab in enumerate(labels) if lab != IGNORE]
    assert scored == tok.encode("A good fortune.") + [tok.eot_id]
    assert all(lab == ids[i + 1] for i, lab in enumerate(labels) if lab != IGNORE)


def test_export_loads_with_herd_and_gives_the_same_logits(tmp_path, demo_tokenizer):
    vocab = 428
    model = build_model(demo_config(vocab, bos_token_id=300, eos_token_ids=(301, 307, 308), pad_token_id=318, **TINY))
    stream = random_stream(vocab=300)
    Trainer(model, cfg(max_steps=3), RandomWindows(stream, 2, 16)).fit()
    out = export_hf(model, tmp_path / "model", tokenizer_dir=demo_tokenizer, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama4_text"
    llm = herd.load(out)
    ids = torch.tensor([[300] + llm.tokenizer.encode("It is a truth universally acknowledged")])
    with torch.no_grad():
        want = model(ids).float()
    torch.testing.assert_close(llm.logits(ids), want, rtol=1e-5, atol=1e-5)
    assert llm.tokenizer.token_id("<|eot|>") == 308
    assert llm.config.num_local_experts == 4 and not llm.config.uses_rope(3)


def test_demo_shape_meets_the_issue():
    config = demo_config(8192 + 128, 8192, (8193, 8199, 8200), 8210)
    assert check_demo_shape(config) == []
    assert parameter_split(config)["experts_share"] > 0.75
    assert config.num_local_experts == 16 and config.num_experts_per_tok == 1 and config.use_qk_norm
    assert (config.attention_chunk_size, config.floor_scale, config.attn_scale) == (8192, 8192.0, 0.1)
    assert DEMO_SHAPE["hidden_size"] % 256 == 0

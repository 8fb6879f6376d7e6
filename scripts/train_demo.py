#!/usr/bin/env python3
"""Train herd's demo model end to end: tokenizer, token ids, pretraining, chat fine-tune, export, report.

    python scripts/build_corpus.sh CORPUS                       # once (~1-2 min, package registries only)
    python scripts/train_demo.py --corpus CORPUS --out runs/demo --pretrain-minutes 50 --chat-minutes 12

Phases (each resumes from its last checkpoint when the script is run again with the same --out):

1. tokenizer  ``OUT/tokenizer``: byte-level BPE (scripts/train_demo_tokenizer.py), unless --tokenizer is given
2. ids        ``OUT/ids/{train,valid,test}.npy``: BOS + document + EOS streams (int32)
3. pretrain   ``OUT/pretrain``: random 256-token windows, AdamW, warmup + cosine, router balance loss
4. chat       ``OUT/chat``: English dialogues of chat_train.jsonl in the Llama 4 chat format (loss on the
              assistant's turns only), mixed with some pretraining rows
5. export     ``OUT/model``: HF layout (config.json, model.safetensors, tokenizer files) for ``herd.load``
6. report     ``OUT/summary.json``: losses, perplexities, unigram baseline, expert use, samples, timings
7. ship       ``--ship FILE``: the exported model as the bundled GGUF (Q8_0: the best type under ~40 MB)

``--pretrain-minutes``/``--chat-minutes`` fix each phase's step count from the measured step time; the
summary records the resolved counts and a ``reproduce`` command with ``--pretrain-steps``/``--chat-steps``
that retrains the same model (same seed, same steps) wherever it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "And God said unto Moses,",
    "In Python, a list is",
    "The capital of France is",
    "Shall I compare thee",
]
QUESTIONS = [
    "What is the capital of Norway?",
    "Hello, how are you?",
    'What does the word "river" mean?',
    "Tell me about Japan.",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="directory written by scripts/build_corpus.sh")
    ap.add_argument("--out", default="runs/demo", help="working and output directory (default runs/demo)")
    ap.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    ap.add_argument("--vocab", type=int, default=8192, help="learned BPE tokens (specials come after)")
    ap.add_argument("--pretrain-minutes", type=float, default=50.0)
    ap.add_argument("--pretrain-steps", type=int, default=0, help="fixed step count (overrides the minutes)")
    ap.add_argument("--chat-minutes", type=float, default=12.0)
    ap.add_argument("--chat-steps", type=int, default=0, help="fixed step count (overrides the minutes)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--chat-lr", type=float, default=1e-3)
    ap.add_argument("--chat-warmup", type=int, default=20)
    ap.add_argument("--chat-text-rows", type=int, default=2, help="pretraining rows in each chat batch")
    ap.add_argument("--aux", type=float, default=0.01, help="router load-balancing loss coefficient")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster only on CPUs with bf16 units)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=12, help="validation batches (of --batch x --seq)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--max-train-mb", type=float, default=0, help="use only this many MB of train.txt (smoke runs)")
    ap.add_argument("--export-dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--ship", help="also write the exported model as this Q8_0 GGUF (src/herd/data/demo/...)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def ship_gguf(model_dir: Path, target: Path, progress: bool = True) -> Path:
    """The bundled file: matrices Q8_0 (F16 would be ~64 MB), norms/router F32, tokenizer + chat template."""
    from herd.config import Config
    from herd.llm import _read_chat_template
    from herd.weights.gguf_write import OUTTYPES, hf_tensor_getter, write_gguf

    config = Config.from_file(model_dir / "config.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(target, config, hf_tensor_getter(model_dir, config), model_dir,
               chat_template=_read_chat_template(model_dir), outtype=OUTTYPES["q8_0"], name="herd-demo",
               progress=progress)
    return target


def log(msg: str) -> None:
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ phases


def phase_tokenizer(a, out: Path) -> Path:
    if a.tokenizer:
        return Path(a.tokenizer)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from train_demo_tokenizer import train_demo_tokenizer

        t0 = time.time()
        train_demo_tokenizer(a.corpus, tok_dir, vocab=a.vocab, max_mb=a.max_train_mb)
        log(f"tokenizer trained in {time.time() - t0:.0f}s -> {tok_dir}")
    return tok_dir


def phase_ids(a, out: Path, tok, tok_dir: Path) -> dict[str, Path]:
    from herd.train import encode_documents, read_documents

    ids_dir = out / "ids"
    ids_dir.mkdir(parents=True, exist_ok=True)
    stamp = {"tokenizer": sha256(tok_dir / "tokenizer.json"), "max_train_mb": a.max_train_mb}
    stamp_file = ids_dir / "stamp.json"
    paths = {s: ids_dir / f"{s}.npy" for s in ("train", "valid", "test")}
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and all(p.is_file() for p in paths.values()):
        return paths
    for split, path in paths.items():
        t0 = time.time()
        docs = read_documents(Path(a.corpus) / f"{split}.txt")
        if split == "train" and a.max_train_mb:
            keep, size = [], 0
            for d in docs:
                keep.append(d)
                size += len(d)
                if size >= a.max_train_mb * 1e6:
                    break
            docs = keep
        stream = encode_documents(docs, tok, path)
        log(f"{split}: {len(docs)} documents -> {len(stream):,} tokens in {time.time() - t0:.0f}s")
    stamp_file.write_text(json.dumps(stamp))
    return paths


def chat_examples(path: Path, tok, limit: int | None = None):
    from herd.tokenizer import ChatFormat
    from herd.train import encode_chat, read_chat_jsonl

    fmt = ChatFormat(tok)
    convs = read_chat_jsonl(path, langs=("en",))
    if limit:
        convs = convs[:limit]
    return [encode_chat(c, fmt) for c in convs]


def train_config(a, phase: str, **kw):
    from herd.train import TrainConfig

    minutes = getattr(a, f"{phase}_minutes")
    steps = getattr(a, f"{phase}_steps")
    return TrainConfig(
        max_steps=steps,
        max_minutes=None if steps else minutes,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        grad_clip=1.0,
        bf16=a.bf16,
        aux_loss_coef=a.aux,
        eval_every=a.eval_every,
        log_every=10,
        ckpt_every=a.ckpt_every,
        seed=a.seed,
        progress=not a.no_progress,
        desc=phase,
        **kw,
    )


def run_phase(trainer, name: str) -> dict:
    if trainer.resume():
        log(f"{name}: resumed at step {trainer.step}")
    done = trainer.calibrated and trainer.step >= trainer.total_steps
    if done:
        log(f"{name}: already complete ({trainer.step} steps)")
        if trainer.last_eval is None:
            trainer.last_eval = dict(trainer.evaluate(), step=trainer.step)
        return trainer.summary()
    t0 = time.time()
    summary = trainer.fit()
    summary["wall_seconds"] = round(time.time() - t0, 1)
    log(f"{name}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, {summary['tok_per_s']:.0f} tok/s")
    return summary


def bits_per_byte(loss: float, stream: np.ndarray, text_bytes: int, specials: int) -> float:
    """Convert nats/token on this stream into bits per UTF-8 byte of text (tokenizer-independent)."""
    tokens = len(stream) - specials
    return loss * tokens / text_bytes / math.log(2)


def samples(model_dir: Path, seed: int) -> dict:
    import herd

    llm = herd.load(model_dir, dtype="f32")
    out = {"continuations": [], "chat": []}
    for i, p in enumerate(PROMPTS):
        text = llm.complete(p, max_tokens=48, temperature=0.7, top_p=0.9, seed=seed + i)
        out["continuations"].append({"prompt": p, "text": text})
    for i, q in enumerate(QUESTIONS):
        reply = llm.chat([{"role": "user", "content": q}], max_tokens=64, temperature=0.6, top_p=0.9, seed=seed + i)
        out["chat"].append({"user": q, "assistant": reply.get("content")})
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from herd.tokenizer import Tokenizer
    from herd.train import (
        MixedBatches,
        PackedChat,
        RandomWindows,
        Trainer,
        chat_eval_batches,
        export_hf,
        fixed_windows,
        load_stream,
        unigram_cross_entropy,
        utilisation_summary,
    )
    from herd.train.demo import build_model, check_demo_shape, demo_config, parameter_split

    tok_dir = phase_tokenizer(a, out)
    tok = Tokenizer.from_hf_json(tok_dir / "tokenizer.json")
    ids = phase_ids(a, out, tok, tok_dir)
    train_stream, valid_stream = load_stream(ids["train"]), load_stream(ids["valid"])
    bos = tok.bos_id

    config = demo_config(tok.vocab_size, bos, tuple(tok.stop_ids), tok.pad_id)
    problems = check_demo_shape(config)
    if problems:
        log("warning: " + "; ".join(problems))
    split = parameter_split(config)
    log(f"model: {split['total']:,} parameters, routed experts {split['experts_share']:.1%}")
    model = build_model(config, seed=a.seed)

    # ---------------- pretrain
    valid_batches = fixed_windows(valid_stream, a.batch, a.seq, max_batches=a.eval_batches, ignore_ids=(bos,))
    pre = Trainer(
        model,
        train_config(a, "pretrain", lr=a.lr, warmup_steps=a.warmup),
        RandomWindows(train_stream, a.batch, a.seq, seed=a.seed, ignore_ids=(bos,)),
        valid_batches,
        out / "pretrain",
    )
    pre_summary = run_phase(pre, "pretrain")
    pre_valid = pre.last_eval

    # ---------------- chat fine-tune
    chat_train = chat_examples(Path(a.corpus) / "chat_train.jsonl", tok)
    chat_test = chat_examples(Path(a.corpus) / "chat_test.jsonl", tok, limit=400)
    text_rows = min(a.chat_text_rows, a.batch - 1)
    source = PackedChat(chat_train, a.batch - text_rows, a.seq, tok.pad_id, seed=a.seed + 1)
    if text_rows:
        source = MixedBatches(source, RandomWindows(train_stream, text_rows, a.seq, seed=a.seed + 2, ignore_ids=(bos,)))
    chat_eval = chat_eval_batches(chat_test, a.batch, a.seq, tok.pad_id)
    chat = Trainer(
        model,
        train_config(a, "chat", lr=a.chat_lr, warmup_steps=a.chat_warmup),
        source,
        chat_eval,
        out / "chat",
    )
    chat_summary = run_phase(chat, "chat")

    # ---------------- final numbers on the text validation set (after the fine-tune)
    text_eval = Trainer(model, train_config(a, "pretrain"), pre.train_data, valid_batches)
    final_valid = text_eval.evaluate()
    unigram = unigram_cross_entropy(train_stream, valid_batches, tok.vocab_size)
    valid_text_bytes = sum(len(d.encode()) for d in (Path(a.corpus) / "valid.txt").read_text(encoding="utf-8").split("\n\f\n"))
    n_docs = int((np.asarray(valid_stream) == bos).sum())

    # ---------------- export + samples through herd.load
    model_dir = out / "model"
    export_hf(
        model,
        model_dir,
        tokenizer_dir=tok_dir,
        dtype=torch.bfloat16 if a.export_dtype == "bf16" else torch.float32,
        metadata={"herd_recipe": "scripts/train_demo.py", "seed": str(a.seed)},
    )
    log(f"exported -> {model_dir}")
    sampled = samples(model_dir, a.seed)

    reproduce = ["python", "scripts/train_demo.py"]
    fixed = {"pretrain_minutes", "chat_minutes", "pretrain_steps", "chat_steps", "no_progress"}
    for key, value in vars(a).items():
        if key in fixed or value is None or value is False:
            continue
        reproduce += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    reproduce += ["--pretrain-steps", str(pre.total_steps), "--chat-steps", str(chat.total_steps)]
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "reproduce": shlex.join(reproduce),
        "wall_seconds": round(time.time() - t_start, 1),
        "threads": a.threads,
        "bf16_autocast": a.bf16,
        "model": {
            "config": {k: v for k, v in config.to_dict().items() if k not in ("vision", "rope_freq_factors")},
            "parameters": split["total"],
            "active_parameters_per_token": split["active_per_token"],
            "parameters_by_group": split["by_group"],
            "routed_experts_share": round(split["experts_share"], 4),
        },
        "data": {
            "train_tokens": int(len(train_stream)),
            "valid_tokens": int(len(valid_stream)),
            "valid_tokens_scored": final_valid["valid_tokens"],
            "tokenizer_vocab": tok.vocab_size,
            "valid_bytes_per_token": round(valid_text_bytes / (len(valid_stream) - 2 * n_docs), 3),
            "chat_train_conversations": len(chat_train),
        },
        "pretrain": pre_summary,
        "chat": chat_summary,
        "tokens_seen": pre_summary["tokens_seen"] + chat_summary["tokens_seen"],
        "final_train_loss": {"pretrain": pre_summary["final_train_loss"], "chat": chat_summary["final_train_loss"]},
        "valid": {
            "after_pretrain_loss": pre_valid["valid_loss"] if pre_valid else None,
            "loss": final_valid["valid_loss"],
            "perplexity": final_valid["valid_ppl"],
            "bits_per_byte": bits_per_byte(final_valid["valid_loss"], valid_stream, valid_text_bytes, 2 * n_docs),
            "unigram_loss": unigram,
            "unigram_perplexity": math.exp(unigram),
            "chat_valid_loss": chat.last_eval["valid_loss"] if chat.last_eval else None,
        },
        "expert_utilisation": final_valid["utilisation"],
        "expert_balance": utilisation_summary(final_valid["utilisation"]),
        "samples": sampled,
    }
    if a.ship:
        shipped = ship_gguf(model_dir, Path(a.ship), progress=not a.no_progress)
        summary["shipped"] = {"file": str(shipped), "bytes": shipped.stat().st_size, "sha256": sha256(shipped)}
        log(f"shipped {shipped} ({shipped.stat().st_size:,} bytes)")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    log(
        f"done in {summary['wall_seconds'] / 60:.1f} min: valid loss {final_valid['valid_loss']:.3f} "
        f"(ppl {final_valid['valid_ppl']:.1f}; unigram ppl {math.exp(unigram):.1f}) -> {out / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    main()

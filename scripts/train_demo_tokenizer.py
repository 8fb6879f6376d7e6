#!/usr/bin/env python3
"""Train the demo model's byte-level BPE tokenizer (Llama 4's split regex and special tokens).

    python scripts/train_demo_tokenizer.py CORPUS_DIR OUT_DIR [--vocab 8192] [--max-mb 0]

CORPUS_DIR is what scripts/build_corpus.sh wrote (train.txt and chat_train.jsonl are used). OUT_DIR gets
``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos, pad, chat template), loadable with
``herd.tokenizer.Tokenizer.from_hf_json`` and with transformers' ``PreTrainedTokenizerFast``.

Ids 0..VOCAB-1 are the learned byte-level tokens (the 256 byte symbols first). The special tokens come
after them, like Meta's: the first 93 keep Meta's order and offsets (``<|begin_of_text|>`` = VOCAB + 0,
``<|eot|>`` = VOCAB + 8, ``<|patch|>`` = VOCAB + 92, as 200000 + k in Llama 4), followed by
``<|reasoning_thinking_start|>``/``<|reasoning_thinking_end|>`` and reserved tokens up to 128 specials.
Training is deterministic for a given corpus (the ``tokenizers`` BPE trainer breaks ties by order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NUM_SPECIAL = 128
META_PREFIX = 93  # Meta's specials 200000..200092 (<|begin_of_text|> .. <|patch|>), kept in order

# The Llama 4 chat format (as herd.tokenizer.chat.ChatFormat writes it) as a Jinja template, for tools that
# read tokenizer_config.json. Tool calls are not rendered: the demo model was not trained on them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|header_start|>' + role + '<|header_end|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eom|>' if role == 'ipython' else '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}{% endif %}"
)


def special_token_names() -> list[str]:
    from herd.tokenizer.tokenizer import llama4_special_token_names

    meta = llama4_special_token_names()
    names = meta[:META_PREFIX] + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    assert names[META_PREFIX - 1] == "<|patch|>" and names[8] == "<|eot|>"
    i = 0
    while len(names) < NUM_SPECIAL:
        names.append(f"<|reserved_special_token_{i}|>")
        i += 1
    return names


def corpus_texts(corpus: Path, max_bytes: int):
    """Documents of train.txt, then the English chat turns (so chat words get tokens too)."""
    seen = 0
    with open(corpus / "train.txt", encoding="utf-8") as f:
        for doc in f.read().split("\n\f\n"):
            seen += len(doc)
            yield doc
            if max_bytes and seen >= max_bytes:
                break
    chat = corpus / "chat_train.jsonl"
    if chat.is_file():
        with open(chat, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("lang", "en") == "en":
                    yield "\n\n".join(m["content"] for m in rec["messages"])


def build_tokenizer(texts, vocab: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from herd.tokenizer.tokenizer import O200K_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"BPE training gave {tok.get_vocab_size()} tokens, expected {vocab} (corpus too small?)")
    names = special_token_names()
    tok.add_special_tokens(names)
    bos = tok.token_to_id("<|begin_of_text|>")
    assert bos == vocab, bos
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def tokenizer_config(vocab: int) -> dict:
    names = special_token_names()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "add_bos_token": True,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(vocab + i): {"content": n, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
            for i, n in enumerate(names)
        },
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_demo_tokenizer(corpus: str | Path, out: str | Path, vocab: int = 8192, max_mb: float = 0) -> Path:
    corpus, out = Path(corpus), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus_texts(corpus, int(max_mb * 1e6)), vocab)
    write_atomic(out / "tokenizer.json", tok.to_str(pretty=False))
    write_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config(vocab), indent=1, ensure_ascii=False))
    return out / "tokenizer.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", help="directory written by scripts/build_corpus.sh")
    ap.add_argument("out", help="directory for tokenizer.json + tokenizer_config.json")
    ap.add_argument("--vocab", type=int, default=8192, help="learned (non-special) tokens, default 8192")
    ap.add_argument("--max-mb", type=float, default=0, help="train on at most this many MB of train.txt (0 = all)")
    a = ap.parse_args()
    t0 = time.time()
    path = train_demo_tokenizer(a.corpus, a.out, a.vocab, a.max_mb)

    from herd.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_json(path)
    sample = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    print(
        f"wrote {path} ({tok.vocab_size} ids: {a.vocab} learned + {NUM_SPECIAL} special) in {time.time() - t0:.0f}s; "
        f"sample: {len(sample)} chars -> {len(ids)} tokens",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""Training data: token streams on disk, random windows over them, and chat examples.

A *token stream* is an int32 ``.npy`` file of documents laid end to end, each ``BOS ... EOS``
(``encode_documents`` writes one). Training batches are random windows of ``seq_len + 1`` tokens cut
anywhere in the stream (documents are packed; a window may span a document boundary). A target that
is BOS -- the first token of the next document, which nothing before it predicts -- is not scored.

Chat examples are tokenized in the Llama 4 chat format with a loss mask that scores only what the
assistant writes (its content and the closing ``<|eot|>``); several examples are packed into each row.

A batch is a dict ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` where ``labels`` is
``IGNORE`` (-100) wherever no loss is taken. Every sampler draws from its own ``torch.Generator`` and
exposes ``state_dict``/``load_state_dict`` so training can resume bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

IGNORE = -100
DOC_SEP = "\n\f\n"  # document separator of scripts/build_corpus.sh's text files


# ----------------------------------------------------------------------------------- token streams


def encode_documents(docs: Iterable[str], tokenizer, out_path: str | Path | None = None) -> np.ndarray:
    """BOS + tokens + EOS for every document, as one int32 array (saved atomically to `out_path` if given)."""
    parts: list[np.ndarray] = []
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    for doc in docs:
        ids = tokenizer.encode(doc)
        parts.append(np.asarray([bos, *ids, eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if out_path is not None:
        save_stream(stream, out_path)
    return stream


def read_documents(path: str | Path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    return [d for d in text.split(DOC_SEP) if d.strip()]


def save_stream(stream: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.asarray(stream, dtype=np.int32))
    os.replace(tmp, path)


def load_stream(path: str | Path) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    if arr.dtype != np.int32 or arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D int32 token stream, got {arr.dtype} {arr.shape}")
    return arr


def _labels_from(targets: torch.Tensor, ignore_ids: Sequence[int]) -> torch.Tensor:
    labels = targets.clone()
    for i in ignore_ids:
        labels[labels == i] = IGNORE
    return labels


class RandomWindows:
    """Endless batches of random windows over a token stream (packing across documents)."""

    def __init__(
        self,
        stream: np.ndarray | str | Path,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        ignore_ids: Sequence[int] = (),
    ):
        self.stream = load_stream(stream) if isinstance(stream, (str, Path)) else stream
        if len(self.stream) < seq_len + 2:
            raise ValueError(f"token stream of {len(self.stream)} tokens is shorter than one window ({seq_len + 1})")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.ignore_ids = tuple(ignore_ids)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def next_batch(self) -> dict[str, torch.Tensor]:
        hi = len(self.stream) - self.seq_len - 1
        starts = torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator).tolist()
        rows = np.stack([np.asarray(self.stream[s : s + self.seq_len + 1]) for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": _labels_from(rows[:, 1:], self.ignore_ids)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_windows(
    stream: np.ndarray | str | Path,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    ignore_ids: Sequence[int] = (),
) -> list[dict[str, torch.Tensor]]:
    """Deterministic evaluation batches: consecutive non-overlapping windows from the start of the stream,
    or, when the stream holds more than `max_batches` worth, windows spread evenly over all of it."""
    stream = load_stream(stream) if isinstance(stream, (str, Path)) else stream
    n_windows = (len(stream) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window ({seq_len + 1})")
    want = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    picks = np.linspace(0, n_windows - 1, want).round().astype(np.int64) if want < n_windows else np.arange(n_windows)
    batches = []
    for b in range(0, len(picks), batch_size):
        rows = np.stack([np.asarray(stream[p * seq_len : p * seq_len + seq_len + 1]) for p in picks[b : b + batch_size]])
        rows = torch.from_numpy(rows.astype(np.int64))
        batches.append({"input_ids": rows[:, :-1], "labels": _labels_from(rows[:, 1:], ignore_ids)})
    return batches


def unigram_cross_entropy(train_stream: np.ndarray, batches: Sequence[dict], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model fitted on `train_stream`, over the
    scored labels of `batches`: the baseline a language model has to beat."""
    counts = np.bincount(np.asarray(train_stream), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for batch in batches:
        labels = batch["labels"].numpy().reshape(-1)
        labels = labels[labels != IGNORE]
        total -= float(logp[labels].sum())
        n += labels.size
    return total / max(n, 1)


# ----------------------------------------------------------------------------------- chat examples


def read_chat_jsonl(path: str | Path, langs: Sequence[str] | None = ("en",)) -> list[list[dict]]:
    """Conversations (lists of {"role", "content"}) from a JSONL file of {"messages": [...], "lang": ...}."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if langs is not None and rec.get("lang", "en") not in langs:
                continue
            out.append(rec["messages"])
    return out


def encode_chat(messages: list[dict], chat_format) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation in the Llama 4 chat format; labels score only the assistant's
    content and terminator, never the headers or the other roles' turns."""
    ids = [chat_format.tok.bos_id]
    labels = [IGNORE]
    header_len = len(chat_format.header("assistant"))
    for i, message in enumerate(messages):
        piece = chat_format.encode_message(message, i)
        ids += piece
        if message.get("role") == "assistant":
            labels += [IGNORE] * header_len + piece[header_len:]
        else:
            labels += [IGNORE] * len(piece)
    # labels[t] says whether token t is scored; shift so position t predicts token t + 1
    return ids, labels[1:] + [IGNORE]


class PackedChat:
    """Endless batches of chat examples packed whole into rows of `seq_len` tokens (shuffled per epoch).

    An example longer than a row is cut to the row. Unused tail positions hold `pad_id` and are not scored.
    """

    def __init__(
        self,
        examples: Sequence[tuple[list[int], list[int]]],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
    ):
        if not examples:
            raise ValueError("no chat examples")
        self.examples = list(examples)
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def next_batch(self) -> dict[str, torch.Tensor]:
        inputs = torch.full((self.batch_size, self.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((self.batch_size, self.seq_len), IGNORE, dtype=torch.long)
        for row in range(self.batch_size):
            filled = 0
            while filled < self.seq_len:
                ids, lab = self._peek()
                if filled and filled + len(ids) > self.seq_len:
                    break  # does not fit: it starts the next row
                ids, lab = self._take()
                n = min(len(ids), self.seq_len - filled)
                inputs[row, filled : filled + n] = torch.tensor(ids[:n])
                labels[row, filled : filled + n] = torch.tensor(lab[:n])
                filled += n
        return {"input_ids": inputs, "labels": labels}

    def _peek(self) -> tuple[list[int], list[int]]:
        if self.pos >= len(self.order):
            self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            self.pos = 0
            self.epoch += 1
        return self.examples[self.order[self.pos]]

    def _take(self) -> tuple[list[int], list[int]]:
        ex = self._peek()
        self.pos += 1
        return ex

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": torch.tensor(self.order, dtype=torch.long),
            "pos": self.pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].tolist()
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


def chat_eval_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int):
    """Deterministic evaluation batches: each example once, in order, packed like PackedChat."""
    rows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for ids, lab in examples:
        if cur_ids and len(cur_ids) + len(ids) > seq_len:
            rows.append((cur_ids, cur_lab))
            cur_ids, cur_lab = [], []
        cur_ids += ids[: seq_len - len(cur_ids)]
        cur_lab += lab[: seq_len - len(cur_lab)]
    if cur_ids:
        rows.append((cur_ids, cur_lab))
    batches = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        inputs = torch.full((len(chunk), seq_len), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), seq_len), IGNORE, dtype=torch.long)
        for r, (ids, lab) in enumerate(chunk):
            inputs[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
        batches.append({"input_ids": inputs, "labels": labels})
    return batches


class MixedBatches:
    """Each batch stacks rows from several sources (e.g. chat rows plus some pretraining text rows, to keep
    a fine-tune from forgetting). Sources must share seq_len; each gives its own batch_size rows."""

    def __init__(self, *sources):
        self.sources = sources

    @property
    def tokens_per_batch(self) -> int:
        return sum(int(getattr(s, "tokens_per_batch", 0)) for s in self.sources)

    def next_batch(self) -> dict[str, torch.Tensor]:
        parts = [s.next_batch() for s in self.sources]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self) -> dict:
        return {"sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)

"""KV cache for a batch of sequences, one slot table per layer.

Every stored key carries its absolute position (``-1`` = empty slot), so one masking rule serves all
layers and every row may sit at its own position (what batched serving needs):

* full-attention (NoPE) layers keep every position: slot = position;
* chunked layers keep at most ``attention_chunk_size`` positions: slot = position mod chunk, so memory
  is bounded however long the context. Keys of an earlier chunk that still sit in the ring are never
  attended to: the mask only admits keys of the query's own chunk.
"""

from __future__ import annotations

import torch

from ..config import Config


class LayerCache:
    """K/V slots of one attention layer for B rows."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, limit: int | None, dtype, device):
        self.limit = limit  # max slots (the chunk size) or None for unbounded
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.step_memo: dict = {}  # shared by every layer of one KVCache, emptied when the cache changes

    def shared_mask(self, positions: torch.Tensor, key_pos: torch.Tensor, chunk: int | None, build) -> torch.Tensor:
        """``build(positions, key_pos, chunk)``, made once per forward step for all layers of one kind: every
        layer of a kind stores the same positions in the same slots, so their masks are equal (one set of
        mask ops per step instead of one per layer)."""
        memo = self.step_memo
        if memo.get("positions") is not positions:
            memo.clear()
            memo["positions"] = positions  # held, so its id cannot be reused while the memo lives
        key = (chunk, tuple(key_pos.shape))
        mask = memo.get(key)
        if mask is None:
            mask = memo[key] = build(positions, key_pos, chunk)
        return mask

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _grow(self, needed: int) -> None:
        if self.limit is not None:
            needed = min(needed, self.limit)
        if needed <= self.capacity:
            return
        new_cap = max(needed, min(2 * self.capacity, self.limit or 1 << 62), 16)
        if self.limit is not None:
            new_cap = min(new_cap, self.limit)
        self._pad_to(new_cap)

    def _pad_to(self, new_cap: int) -> None:
        extra = new_cap - self.capacity
        if extra <= 0:
            return
        b, h, _, d = self.k.shape
        pad = torch.zeros(b, h, extra, d, dtype=self.k.dtype, device=self.k.device)
        self.k = torch.cat([self.k, pad], dim=2)
        self.v = torch.cat([self.v, pad.clone()], dim=2)
        self.pos = torch.cat([self.pos, torch.full((b, extra), -1, dtype=torch.long, device=self.pos.device)], dim=1)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (keys, values, key positions) to attend over — the stored ones followed by the new ones —
        then store the new ones. k, v: [B, Hkv, T, D]; positions: [B, T].

        One new token (decoding) is stored first and the stored slots are returned as they are, without
        copying the cache: the slot it may overwrite in a ring holds a key of an earlier chunk, which the
        mask hides from this query anyway. Several tokens could overwrite keys that an earlier query of the
        same step still needs, so they are attended to before being stored."""
        if k.shape[2] == 1:
            self._store(k, v, positions)
            return self.k, self.v, self.pos
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.pos, positions], dim=1)
        if self.limit is not None and k.shape[2] > self.limit:
            # Only the last `limit` new tokens can still be needed by later queries.
            k, v, positions = k[:, :, -self.limit :], v[:, :, -self.limit :], positions[:, -self.limit :]
        self._store(k, v, positions)
        return keys, values, key_pos

    def _store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self._grow(int(positions.max()) + 1)
        slots = positions % self.limit if self.limit is not None else positions
        if k.shape[0] == 1:  # one row: contiguous copies by slot (scatter_ is ~20x slower on bfloat16 caches)
            self.k.index_copy_(2, slots[0], k.to(self.k.dtype))
            self.v.index_copy_(2, slots[0], v.to(self.v.dtype))
            self.pos.index_copy_(1, slots[0], positions)
            return
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        self.pos.scatter_(1, slots, positions)

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        self.pos[rows] = -1

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.k, self.v, self.pos = self.k[rows], self.v[rows], self.pos[rows]

    def append_rows(self, other: "LayerCache") -> None:
        """Add the rows of `other` (same layer of another cache) after this cache's rows."""
        cap = max(self.capacity, other.capacity)
        self._pad_to(cap)
        other._pad_to(cap)
        self.k = torch.cat([self.k, other.k.to(self.k.dtype)], dim=0)
        self.v = torch.cat([self.v, other.v.to(self.v.dtype)], dim=0)
        self.pos = torch.cat([self.pos, other.pos], dim=0)


class KVCache:
    """The cache of a whole model for B rows; ``seq_lens[b]`` is the next position of row b."""

    def __init__(self, config: Config, batch: int = 1, dtype=torch.float32, device="cpu"):
        self.config = config
        self.layers = [
            LayerCache(
                batch,
                config.num_key_value_heads,
                config.head_dim,
                config.attention_chunk_size if config.is_chunked(i) else None,
                dtype,
                device,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.step_memo: dict = {}
        for layer in self.layers:
            layer.step_memo = self.step_memo
        self.seq_lens = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    def next_positions(self, length: int) -> torch.Tensor:
        """Positions [B, length] for the next `length` tokens of every row."""
        return self.seq_lens[:, None] + torch.arange(length, device=self.seq_lens.device)

    def advance(self, length: int) -> None:
        self.seq_lens += length
        self.step_memo.clear()

    def reset(self, rows: list[int] | None = None) -> None:
        self.step_memo.clear()
        rows_t = list(range(self.batch_size)) if rows is None else rows
        for layer in self.layers:
            layer.reset_rows(rows_t)
        self.seq_lens[rows_t] = 0

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (in that order): a finished sequence frees its slots."""
        self.step_memo.clear()
        index = torch.tensor(rows, dtype=torch.long, device=self.seq_lens.device)
        for layer in self.layers:
            layer.keep_rows(index)
        self.seq_lens = self.seq_lens[index]

    def append_rows(self, other: "KVCache") -> None:
        """Admit the sequences of `other` (e.g. a freshly prefilled batch of one) as new rows."""
        self.step_memo.clear()
        for mine, theirs in zip(self.layers, other.layers):
            mine.append_rows(theirs)
        self.seq_lens = torch.cat([self.seq_lens, other.seq_lens])

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes + layer.pos.nbytes for layer in self.layers)

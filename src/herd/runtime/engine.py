"""Continuous batching: many requests decode together on one model.

A background thread owns the model. Between decode steps it admits waiting requests (prefilled one at a
time into a batch-of-one cache, then appended as a new row of the shared cache), runs one decode step
for every active row at once (rows sit at different positions; the cache's per-slot positions keep
them apart), lets each request's own sampler pick its token, and drops finished or cancelled rows at
once. At most ``max_batch`` requests run; the rest wait in FIFO order.

The engine deals in token ids only; turning them into text (stop strings, UTF-8 boundaries) is the
caller's job, the same code as single-request generation uses.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ContextOverflowError


@dataclass
class Request:
    """One generation request. The consumer reads ``events`` until ("done", reason) or ("error", msg)."""

    prompt_ids: list[int]
    sampler: Any  # object with .sample(logits[V], history: list[int]) -> int
    max_tokens: int
    stop_ids: frozenset[int]
    id: int = 0
    events: Any = field(default_factory=queue.Queue)  # .put(("token", id) | ("done", reason) | ("error", msg))
    generated: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish_reason: str | None = None

    def cancel(self) -> None:
        """Free the request's slot at the next step (e.g. the client disconnected)."""
        self.cancelled.set()


class Engine:
    def __init__(self, model, max_batch: int = 8, ctx: int = 8192, on_step: Callable[[int], None] | None = None):
        self.model = model
        self.max_batch = max_batch
        self.ctx = ctx
        self.on_step = on_step  # observer: called with the batch size of each decode step
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._active: list[Request] = []
        self._cache = None
        self._ids = itertools.count(1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_batch_seen = 0

    # ------------------------------------------------------------------ public
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt_ids: list[int], sampler: Any, max_tokens: int, stop_ids, events: Any = None) -> Request:
        """Queue a request. `events`: any object with ``put(event)`` (default: a thread-safe queue); a server
        passes one that hands events to its event loop."""
        if not prompt_ids:
            raise ContextOverflowError("the prompt is empty (at least one token is needed)")
        if len(prompt_ids) + max_tokens > self.ctx:
            raise ContextOverflowError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} exceeds the context of {self.ctx} tokens"
            )
        req = Request(list(prompt_ids), sampler, max_tokens, frozenset(stop_ids), id=next(self._ids))
        if events is not None:
            req.events = events
        self._waiting.put(req)
        self._wake.set()
        return req

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return self._waiting.qsize()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self._active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as exc:  # never leave a client hanging: fail every running request
                for req in self._active:
                    req.events.put(("error", f"{type(exc).__name__}: {exc}"))
                self._active, self._cache = [], None

    @torch.inference_mode()
    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                req.finish_reason = "cancelled"
                req.events.put(("done", "cancelled"))
                continue
            one = self.model.new_cache(1)
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=one.seq_lens.device)
            logits = self.model(ids, cache=one, last_only=True)[0, -1]
            if self._cache is None:
                self._cache = self.model.new_cache(0)
            self._cache.append_rows(one)
            self._active.append(req)
            self._emit(req, logits)
        self._drop_finished()

    def _emit(self, req: Request, logits: torch.Tensor) -> None:
        token = int(req.sampler.sample(logits.float(), req.prompt_ids + req.generated))
        req.generated.append(token)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.events.put(("token", token))
        if token in req.stop_ids:
            req.finish_reason = "stop"
        elif len(req.generated) >= req.max_tokens:
            req.finish_reason = "length"

    @torch.inference_mode()
    def _step(self) -> None:
        tokens = torch.tensor([[r.generated[-1]] for r in self._active], dtype=torch.long)
        logits = self.model(tokens, cache=self._cache, last_only=True)[:, -1]
        self.max_batch_seen = max(self.max_batch_seen, len(self._active))
        if self.on_step is not None:
            self.on_step(len(self._active))
        for row, req in enumerate(self._active):
            if req.finish_reason is None and not req.cancelled.is_set():
                self._emit(req, logits[row])
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = []
        for row, req in enumerate(self._active):
            if req.cancelled.is_set() and req.finish_reason is None:
                req.finish_reason = "cancelled"
            if req.finish_reason is None:
                keep.append(row)
            else:
                req.events.put(("done", req.finish_reason))
        if len(keep) != len(self._active):
            self._active = [self._active[i] for i in keep]
            if self._cache is not None:
                self._cache.keep_rows(keep)

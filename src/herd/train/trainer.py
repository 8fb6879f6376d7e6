"""A training loop over herd's own Llama 4 modules (full-parameter by default; what trains is pluggable).

``Trainer(model, config, train_data, eval_batches, out_dir)`` runs AdamW (decoupled weight decay on
matrices only) with linear warmup and cosine decay to ``min_lr_ratio`` of the peak, gradient clipping,
optional bf16 autocast, an optional Switch-style router load-balancing loss, periodic validation, expert
utilisation statistics, tqdm progress, a JSONL log, a loss-curve PNG and resumable checkpoints.

Pluggable parts (a later LoRA trainer reuses the loop):

* ``trainable``: which parameters train -- a predicate ``(name, param) -> bool`` or None for all.
* ``loss_fn``: ``(logits [B, T, V], batch) -> scalar loss``; default :func:`causal_lm_loss`.

Checkpoints (``out_dir/checkpoints/step_NNNNNN/``) hold ``model.safetensors`` (herd's canonical names) and
``trainer.pt`` (optimizer state, step, schedule, data-sampler and torch RNG states, history: tensors,
dicts, lists and numbers only, read back with ``torch.load(weights_only=True)``). Each is written to a
temporary directory and renamed into place; ``checkpoints/latest`` names the newest. Resuming restores
everything a step depends on, so a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE

LossFn = Callable[[torch.Tensor, dict], torch.Tensor]
Trainable = Callable[[str, nn.Parameter], bool]


class Batches(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    max_steps: int = 1000
    # With max_minutes, the step count is fixed once, early on, from the measured step time so that the
    # training steps (evaluation excluded) take about that long; it is recorded so a run can be repeated
    # with max_steps alone. A run that overruns the budget by 30% stops at a checkpoint.
    max_minutes: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast (CPU or CUDA); weights, optimizer and loss stay fp32
    aux_loss_coef: float = 0.01  # router load-balancing loss weight (0 = off; still measured)
    eval_every: int = 200
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    calibrate_from: int = 3  # steps [calibrate_from, calibrate_to) time the step for max_minutes
    calibrate_to: int = 15


# ------------------------------------------------------------------------------------------ losses


def causal_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored labels (labels are already shifted)."""
    labels = batch["labels"]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def load_balancing_loss(router_logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss for one MoE layer: E * sum_e f_e * P_e.

    f_e is the fraction of routing assignments (tokens x top-k) that chose expert e (no gradient) and
    P_e the mean over tokens of the router's probabilities, taken as the sigmoid scores normalised to sum
    to 1 over experts. It is 1 when routing is uniform and grows as it concentrates.
    """
    f = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float() / expert_ids.numel()
    s = torch.sigmoid(router_logits.float())
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    return num_experts * (f * p).sum()


class RouterWatch:
    """Hooks on every MoE layer: collects router logits for the balance loss and counts expert use."""

    def __init__(self, model: nn.Module):
        from ..model.moe import MoE

        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.num_experts = self.layers[0][1].experts.num_experts if self.layers else 0
        self.logits: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.counts = {name: torch.zeros(self.num_experts, dtype=torch.long) for name, _ in self.layers}
        self.active = False

    def __enter__(self) -> "RouterWatch":
        self.active = True
        for name, m in self.layers:
            m.logits_hook = self.logits.append
            m.route_hook = self._counter(name)
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        self.clear()
        for _, m in self.layers:
            m.logits_hook = None
            m.route_hook = None

    def _counter(self, name: str):
        def hook(ids: torch.Tensor) -> None:
            self.ids.append(ids)
            self.counts[name] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.num_experts)

        return hook

    def aux_loss(self) -> torch.Tensor | None:
        """Mean balance loss over the MoE layers of the last forward, then forget them."""
        if not self.logits:
            return None
        losses = [load_balancing_loss(z, i, self.num_experts) for z, i in zip(self.logits, self.ids)]
        self.clear()
        return torch.stack(losses).mean()

    def clear(self) -> None:
        self.logits.clear()
        self.ids.clear()

    def reset_counts(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def utilisation(self) -> dict[str, list[float]]:
        """Fraction of routing assignments per expert, per MoE layer (layer index -> list of E fractions)."""
        out = {}
        for name, c in self.counts.items():
            total = int(c.sum())
            out[_layer_index(name)] = [round(float(x) / total, 5) if total else 0.0 for x in c]
        return out


def _layer_index(module_name: str) -> str:
    parts = module_name.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts else module_name


def utilisation_summary(util: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per layer: the busiest and idlest expert's share and the effective number of experts
    (exp of the entropy of the shares; E when perfectly balanced)."""
    out = {}
    for layer, shares in util.items():
        t = torch.tensor(shares, dtype=torch.float64)
        nz = t[t > 0]
        eff = float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0
        out[layer] = {"max": float(t.max()), "min": float(t.min()), "effective_experts": round(eff, 2)}
    return out


# ------------------------------------------------------------------------------------------ trainer


def select_trainable(model: nn.Module, trainable: Trainable | None = None) -> list[tuple[str, nn.Parameter]]:
    """Turn requires_grad on for the chosen parameters (all by default) and off for the rest."""
    chosen = []
    for name, p in model.named_parameters():
        on = trainable(name, p) if trainable is not None else True
        p.requires_grad_(bool(on))
        if on:
            chosen.append((name, p))
    if not chosen:
        raise ValueError("no trainable parameters selected")
    return chosen


def make_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and expert stacks) only; norms and 1-D weights are not decayed."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for update number `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Batches,
        eval_batches: Sequence[dict] | None = None,
        out_dir: str | Path | None = None,
        trainable: Trainable | None = None,
        loss_fn: LossFn | None = None,
    ):
        self.model, self.cfg, self.train_data = model, config, train_data
        self.eval_batches = list(eval_batches or [])
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = loss_fn or causal_lm_loss
        self.params = select_trainable(model, trainable)
        self.optimizer = make_optimizer(self.params, config)
        self.watch = RouterWatch(model)
        self.step = 0
        # until the step time is measured (max_minutes), run open-ended (warmup does not need the total)
        self.total_steps = config.max_steps if config.max_minutes is None or config.max_steps else 10**9
        self.calibrated = config.max_minutes is None
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.last_eval: dict | None = None
        self._calib_time = 0.0
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with self._autocast():
            logits = self.model(batch["input_ids"])
        lm = self.loss_fn(logits, batch)
        aux = self.watch.aux_loss()
        total = lm + self.cfg.aux_loss_coef * aux if (aux is not None and self.cfg.aux_loss_coef) else lm
        return lm, aux, total

    def train_step(self, batch: dict) -> dict:
        lr = lr_at(self.step, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        lm, aux, total = self._forward_loss(batch)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(lm.detach()),
            "aux": float(aux.detach()) if aux is not None else None,
            "grad_norm": float(grad_norm),
            "lr": lr,
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, perplexity and expert utilisation over the fixed evaluation batches."""
        if not self.eval_batches:
            return {}
        total, n = 0.0, 0
        was_active = self.watch.active
        if not was_active:
            self.watch.__enter__()
        self.watch.reset_counts()
        try:
            for batch in self.eval_batches:
                lm, _, _ = self._forward_loss(batch)
                scored = int((batch["labels"] != IGNORE).sum())
                total += float(lm) * scored
                n += scored
            util = self.watch.utilisation()
        finally:
            self.watch.reset_counts()
            if not was_active:
                self.watch.__exit__(None, None, None)
        loss = total / max(n, 1)
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0)), "valid_tokens": n, "utilisation": util}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        self.model.train()
        start_step = self.step
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            total = self.total_steps if self.calibrated else None
            bar = tqdm(total=total, initial=self.step, desc=cfg.desc, unit="step", dynamic_ncols=True)
        window: list[dict] = []
        with self.watch:
            while self.step < self.total_steps:
                batch = self.train_data.next_batch()
                t0 = time.perf_counter()
                metrics = self.train_step(batch)
                dt = time.perf_counter() - t0
                self.step += 1
                self.train_seconds += dt
                self.tokens_seen += int(batch["input_ids"].numel())
                metrics["seconds"] = dt
                metrics["tokens"] = int(batch["input_ids"].numel())
                window.append(metrics)
                self._maybe_calibrate(dt, start_step, bar)
                overrun = cfg.max_minutes is not None and self.train_seconds > 1.3 * 60 * cfg.max_minutes
                if overrun and self.step < self.total_steps:
                    self._record({"event": "stopped", "reason": "time budget overrun", "step": self.step})
                    self.total_steps = self.step
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_train(window, bar)
                    window = []
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                    self._log_eval(bar)
                if self.out_dir is not None and cfg.ckpt_every and (
                    self.step % cfg.ckpt_every == 0 or self.step == self.total_steps
                ):
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.model.eval()
        if self.out_dir is not None:
            self.plot()
        return self.summary()

    def _maybe_calibrate(self, dt: float, start_step: int, bar) -> None:
        cfg = self.cfg
        if self.calibrated:
            return
        done = self.step - start_step
        if done > cfg.calibrate_from:
            self._calib_time += dt
        if done >= cfg.calibrate_to:
            per_step = self._calib_time / (cfg.calibrate_to - cfg.calibrate_from)
            budget = 60 * cfg.max_minutes - self.train_seconds
            steps = self.step + max(1, int(budget / per_step))
            self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
            self.total_steps = max(self.total_steps, self.step)
            self.calibrated = True
            self._record({"event": "calibrated", "step": self.step, "seconds_per_step": per_step, "total_steps": self.total_steps})
            if bar is not None:
                bar.total = self.total_steps
                bar.refresh()

    def _log_train(self, window: list[dict], bar) -> None:
        secs = sum(m["seconds"] for m in window)
        toks = sum(m["tokens"] for m in window)
        rec = {
            "step": self.step,
            "loss": sum(m["loss"] for m in window) / len(window),
            "lr": window[-1]["lr"],
            "grad_norm": max(m["grad_norm"] for m in window),
            "tok_per_s": toks / secs if secs else 0.0,
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 2),
        }
        auxes = [m["aux"] for m in window if m["aux"] is not None]
        if auxes:
            rec["aux"] = sum(auxes) / len(auxes)
        self._record(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}")
            bar.update(self.step - bar.n)

    def _log_eval(self, bar) -> None:
        ev = self.evaluate()
        if not ev:
            return
        self.model.train()
        self.last_eval = dict(ev, step=self.step)
        rec = {"step": self.step, "valid_loss": ev["valid_loss"], "valid_ppl": ev["valid_ppl"]}
        rec["experts"] = utilisation_summary(ev["utilisation"])
        self._record(rec)
        if bar is not None:
            bar.write(f"step {self.step}: valid loss {ev['valid_loss']:.4f} (ppl {ev['valid_ppl']:.1f})")

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def summary(self) -> dict:
        train = [h for h in self.history if "loss" in h]
        return {
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 1),
            "tok_per_s": self.tokens_seen / self.train_seconds if self.train_seconds else 0.0,
            "final_train_loss": train[-1]["loss"] if train else None,
            "valid": self.last_eval,
        }

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path:
        if self.out_dir is None:
            raise ValueError("the trainer has no out_dir")
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        root = self.checkpoint_dir()
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:06d}"
        final = root / name
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(self.step)})
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "calibrated": self.calibrated,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "optimizer": self.optimizer.state_dict(),
            "data": self.train_data.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "last_eval": self.last_eval,
            "config": _plain(asdict(self.cfg)),
        }
        torch.save(state, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name + "\n")
        self._prune(root)
        return final

    def _prune(self, root: Path) -> None:
        keep = max(1, self.cfg.keep_checkpoints)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        state = torch.load(path / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.calibrated = bool(state["calibrated"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.history = list(state["history"])
        self.last_eval = state["last_eval"]

    def latest_checkpoint(self) -> Path | None:
        if self.out_dir is None:
            return None
        pointer = self.checkpoint_dir() / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoint_dir() / pointer.read_text().strip()
        return path if path.is_dir() else None

    def resume(self) -> bool:
        """Load the newest checkpoint in out_dir, if any. -> whether one was loaded."""
        path = self.latest_checkpoint()
        if path is None:
            return False
        self.load_checkpoint(path)
        return True

    # ------------------------------------------------------------------ plot
    def plot(self, path: str | Path | None = None) -> Path:
        from .plot import plot_losses

        path = Path(path) if path is not None else self.out_dir / "loss.png"
        train = [(h["step"], h["loss"]) for h in self.history if "loss" in h]
        valid = [(h["step"], h["valid_loss"]) for h in self.history if "valid_loss" in h]
        plot_losses(path, train, valid, title=self.cfg.desc)
        return path


def _plain(obj):
    """Config values as plain Python containers (tuples become lists) for a weights_only checkpoint."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def count_parameters(params: Iterable[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)

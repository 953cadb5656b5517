"""The training loop. It knows the model only as a module returning ``(logits, loss)``
(with ``compile_for_training()`` for ``train.compile``), reports progress through
callbacks (``events.py``), and never prints.

Stopping is cooperative: ``request_stop()`` (from a signal handler, say) makes the loop save
a checkpoint at the next step boundary and raise ``TrainingStopped``, so a stopped run
resumes exactly where it left off.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.config import TrainConfig
from minigpt_cli.data.batches import WindowSampler, batch_at, eval_starts
from minigpt_cli.device import Precision
from minigpt_cli.errors import CheckpointError, MiniGPTError
from minigpt_cli.run import checkpoint as ckpt
from minigpt_cli.train.events import Callback, Event, Finished, Logged, Saved, Started, Validated


class TrainingStopped(Exception):
    """Training was asked to stop; a checkpoint was saved at ``step``."""

    def __init__(self, step: int, path: Path | None):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.path = path


class TrainingDiverged(MiniGPTError):
    """The loss became NaN or infinite."""


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to ``learning_rate * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    span = max(total_steps - cfg.warmup_steps, 1)
    ratio = min((step - cfg.warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)


def total_steps_for(cfg: TrainConfig, n_windows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum_steps
    return max(1, math.ceil(cfg.epochs * n_windows / per_step))


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, train_tokens: np.ndarray,
                 val_tokens: np.ndarray, seq_len: int, device: torch.device,
                 precision: Precision, run_dir: Path, callbacks: list[Callback] = (),
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        self.model = model
        # torch.compile'd for the training steps only; checkpoints and validation use `model`
        self.train_model = model.compile_for_training() if cfg.compile else model
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.cfg = cfg
        self.seq_len = seq_len
        self.device = device
        self.precision = precision
        self.run_dir = run_dir
        self.callbacks = list(callbacks)
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.sampler = WindowSampler(train_tokens, seq_len, cfg.seed)
        self.total_steps = total_steps_for(cfg, self.sampler.n_windows)
        fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per tensor
        self.optimizer = torch.optim.AdamW(
            model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2), **({"fused": True} if fused else {}))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
        self.step = 0
        self.best_val_loss: float | None = None
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._stop = False

    # ---- control --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop = True

    def _emit(self, event: Event) -> None:
        for cb in self.callbacks:
            cb(event)

    # ---- state ----------------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors, optim_meta = ckpt.flatten_optimizer(self.optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        np_state = np.random.get_state()
        state = {
            "best_val_loss": self.best_val_loss,
            "elapsed": self.elapsed,
            "sampler": self.sampler.state_dict(),
            "optimizer": optim_meta,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng_python": _jsonable(random.getstate()),
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        return state, tensors

    def save(self, best: bool = False) -> Path:
        state, tensors = self._state()
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, state, tensors, best,
                                    self.cfg.keep_last)
        self.last_checkpoint, self._saved_step = path, self.step
        self._emit(Saved(self.step, path, best))
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` exactly: weights, optimizer, data order, RNG."""
        ckpt.load_weights(self.model, path)
        state = ckpt.read_state(path)
        tensors = ckpt.load_training_tensors(path)
        try:
            self.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, state["optimizer"]))
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            self.best_val_loss = state.get("best_val_loss")
            self.elapsed = float(state.get("elapsed", 0.0))
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(tensors["rng.torch"])
            cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if cuda_states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
            random.setstate(_tupled(state["rng_python"]))
            kind, keys, *rest = state["rng_numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"training state in {path} is incomplete or corrupt "
                                       f"({e})") from e
        self.last_checkpoint, self._saved_step = path, self.step

    # ---- loop -----------------------------------------------------------------------------

    def _check_finite(self, value: float, lr: float, what: str = "loss") -> None:
        if not math.isfinite(value):
            where = self.last_checkpoint or "none yet"
            raise TrainingDiverged(
                f"{what} became {value} by step {self.step} (lr {lr:.3g}); nothing saved "
                f"since; last good checkpoint: {where}",
                "start a new run with a lower train.learning_rate or more train.warmup_steps")

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        starts = eval_starts(len(self.val_tokens), self.seq_len,
                             self.cfg.eval_iters * self.cfg.batch_size)
        total, count = torch.zeros((), device=self.device), 0
        for i in range(0, len(starts), self.cfg.batch_size):
            x, y = batch_at(self.val_tokens, starts[i:i + self.cfg.batch_size], self.seq_len)
            with self.precision.autocast(self.device):
                _, loss = self.model(x.to(self.device), y.to(self.device), reduction="sum")
            total += loss.float()
            count += y.numel()
        self.model.train()
        return total.item() / count

    def _train_step(self, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.cfg.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        non_blocking = self.device.type == "cuda"
        for _ in range(accum):
            x, y = self.sampler.next_batch(self.cfg.batch_size)
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            with self.precision.autocast(self.device):
                _, loss = self.train_model(x, y)
            step_loss += loss.detach().float()
            self.scaler.scale(loss / accum).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss / accum

    def _mfu(self, tokens_per_sec: float) -> float | None:
        if not self.flops_per_token or not self.peak_flops:
            return None
        return tokens_per_sec * self.flops_per_token / self.peak_flops

    def fit(self) -> Finished:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * self.seq_len
        self._emit(Started(self.step, self.total_steps,
                           self.sampler.n_windows / (cfg.batch_size * cfg.grad_accum_steps),
                           tokens_per_step, len(self.train_tokens), len(self.val_tokens)))
        self.model.train()
        session_start = time.perf_counter()
        elapsed_before = self.elapsed
        last_log_time, last_log_step = session_start, self.step
        loss = lr = None
        while self.step < self.total_steps:
            if self._stop:
                if self._saved_step == self.step:
                    raise TrainingStopped(self.step, self.last_checkpoint)
                if loss is not None:
                    self._check_finite(loss.item(), lr)
                raise TrainingStopped(self.step, self.save())
            lr = lr_at(self.step, cfg, self.total_steps)
            loss = self._train_step(lr)
            self.step += 1
            final = self.step == self.total_steps
            if self.step % cfg.log_interval == 0 or final:
                loss_value = loss.item()  # the only host sync between checkpoints
                now = time.perf_counter()
                self.elapsed = elapsed_before + (now - session_start)
                self._check_finite(loss_value, lr)
                rate = (self.step - last_log_step) * tokens_per_step / max(now - last_log_time,
                                                                           1e-9)
                last_log_time, last_log_step = now, self.step
                self._emit(Logged(self.step, self.total_steps, self.sampler.epoch, loss_value,
                                  lr, rate, self.elapsed, self._mfu(rate)))
            is_best = False
            if self.step % cfg.eval_interval == 0 or final:
                val = self.validate()
                self._check_finite(val, lr, "validation loss")
                is_best = self.best_val_loss is None or val < self.best_val_loss
                if is_best:
                    self.best_val_loss = val
                self._emit(Validated(self.step, val, self.best_val_loss, is_best))
                last_log_time = time.perf_counter()  # keep evaluation out of tokens/s
            if is_best or self.step % cfg.checkpoint_interval == 0 or final:
                self._check_finite(loss.item(), lr)  # never save a model that diverged
                self.elapsed = elapsed_before + (time.perf_counter() - session_start)
                self.save(best=is_best)
                last_log_time = time.perf_counter()
        self.elapsed = elapsed_before + (time.perf_counter() - session_start)
        done = Finished(self.step, self.best_val_loss, self.elapsed, self.last_checkpoint)
        self._emit(done)
        return done


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def _tupled(obj):
    if isinstance(obj, list):
        return tuple(_tupled(o) for o in obj)
    return obj

"""The training loop. It knows the model only as a module returning ``(logits, loss)``
(with ``compile_for_training()`` for ``train.compile``), reports progress through
callbacks (``events.py``), and never prints.

Stopping is cooperative: ``request_stop()`` (from a signal handler, say) makes the loop save
a checkpoint at the next step boundary and raise ``TrainingStopped``, so a stopped run
resumes exactly where it left off.

In several processes (``distributed.py``) every rank runs this loop on its share of each
batch; the ranks agree on stopping at each step boundary, rank 0 alone reports events and
writes checkpoints, and a rank that dies makes the others raise ``PeerLost``.
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
from minigpt_cli.device import Precision, is_out_of_memory
from minigpt_cli.errors import CheckpointError, MiniGPTError
from minigpt_cli.model import lora
from minigpt_cli.run import checkpoint as ckpt
from minigpt_cli.run import layout
from minigpt_cli.train import distributed
from minigpt_cli.train.events import Callback, Event, Finished, Logged, Saved, Started, Validated


class TrainingStopped(Exception):
    """Training was asked to stop; a checkpoint was saved at ``step``."""

    def __init__(self, step: int, path: Path | None, reason: int = 1):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.path = path
        self.reason = reason  # the largest that any rank was asked to stop with


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


def total_steps_for(cfg: TrainConfig, n_windows: int, world_size: int = 1) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum_steps * world_size
    return max(1, math.ceil(cfg.epochs * n_windows / per_step))


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, train_tokens: np.ndarray,
                 val_tokens: np.ndarray, seq_len: int, device: torch.device,
                 precision: Precision, run_dir: Path, callbacks: list[Callback] = (),
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 train_mask: np.ndarray | None = None, val_mask: np.ndarray | None = None):
        self.dist = distributed.info()
        self.sharded = self.dist.enabled and cfg.strategy == "fsdp"
        if self.sharded:
            distributed.shard(model, precision.dtype)
        self.model = model
        # torch.compile'd for the training steps only; checkpoints and validation use `model`
        self.train_model = model.compile_for_training() if cfg.compile else model
        if self.dist.enabled and not self.sharded:
            self.train_model = distributed.wrap_ddp(self.train_model, device)
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
        self.val_mask = val_mask  # conversations: only the assistant's tokens are scored
        self.sampler = WindowSampler(train_tokens, seq_len, cfg.seed, self.dist.rank,
                                     self.dist.world_size, train_mask)
        self.total_steps = total_steps_for(cfg, self.sampler.n_windows, self.dist.world_size)
        # one kernel per step instead of one per tensor (not for FSDP's sharded DTensors)
        fused = device.type in ("cuda", "cpu") and not self.sharded
        self.optimizer = torch.optim.AdamW(
            model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2), **({"fused": True} if fused else {}))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
        self.step = 0
        self.best_val_loss: float | None = None
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.last_checkpoint: Path | None = None
        self.base: dict[str, str] | None = None  # a LoRA run's base model: path and sha256
        self._saved_step: int | None = None
        self._stop = 0  # the reason to stop (0: none), e.g. the signal that asked

    # ---- control --------------------------------------------------------------------------

    def request_stop(self, reason: int = 1) -> None:
        """Stop at the next step boundary (the next logged step in a job). ``reason`` (> 0,
        say a signal's number) comes back in ``TrainingStopped``: the largest of any rank."""
        self._stop = max(self._stop, reason)

    def _emit(self, event: Event) -> None:
        for cb in self.callbacks:
            cb(event)

    # ---- state ----------------------------------------------------------------------------

    def _rng_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This process's random states: torch's, CUDA's, Python's and numpy's."""
        tensors = {"torch": torch.get_rng_state()}
        if self.dist.enabled and self.device.type == "cuda":
            tensors["cuda"] = torch.cuda.get_rng_state(self.device)
        elif torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda.{i}"] = s
        np_state = np.random.get_state()
        return ({"rng_python": _jsonable(random.getstate()),
                 "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}, tensors)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                              dict[str, torch.Tensor]] | None:
        """Weights, training state and training tensors, on rank 0 (None on the others;
        in several processes every rank must call this: it gathers)."""
        if self.sharded:
            weights, optim_sd = distributed.full_state(self.model, self.optimizer)
        else:
            weights, optim_sd = None, None
        rng = distributed.gather_to_main(self._rng_state())
        if not self.dist.is_main:
            return None
        if self.sharded:
            tensors, optim_meta = ckpt.flatten_optimizer_state(optim_sd)
        else:
            weights = self.model.state_dict()
            tensors, optim_meta = ckpt.flatten_optimizer(self.optimizer)
        if lora.has_adapters(self.model):  # the base is frozen and recorded, not saved
            weights = lora.checkpoint_state(self.model, weights,
                                            (self.base or {}).get("vocab_size"))
        state = {
            "best_val_loss": self.best_val_loss,
            "elapsed": self.elapsed,
            "sampler": self.sampler.state_dict(),
            "optimizer": optim_meta,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        if self.base is not None:
            state["base"] = self.base
        if self.dist.enabled:  # every rank's random state, for an exact resume
            state["world_size"] = self.dist.world_size
            state["rng_ranks"] = [json for json, _ in rng]
            for r, (_, rank_tensors) in enumerate(rng):
                tensors.update({f"rng.rank{r}.{k}": v for k, v in rank_tensors.items()})
        else:
            state.update(rng[0][0])
            tensors.update({f"rng.{k}": v for k, v in rng[0][1].items()})
        return weights, state, tensors

    def save(self, best: bool = False) -> Path:
        saved = self._state()
        path = ckpt.step_dir(self.run_dir, self.step)
        if saved is not None:
            weights, state, tensors = saved
            path = ckpt.save_checkpoint(self.run_dir, self.step, weights, state, tensors,
                                        best, self.cfg.keep_last)
        distributed.barrier()  # no rank goes on (or exits) before the checkpoint is complete
        self.last_checkpoint, self._saved_step = path, self.step
        self._emit(Saved(self.step, path, best))
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` exactly: weights, optimizer, data order, RNG."""
        state = ckpt.read_state(path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"{path.parent.parent} was trained in {saved_world} "
                                  f"process{'es' * (saved_world > 1)}, not "
                                  f"{self.dist.world_size}: its data order and random "
                                  f"states belong to {saved_world} rank"
                                  f"{'s' * (saved_world > 1)}",
                                  f"resume it with {saved_world} process"
                                  f"{'es' * (saved_world > 1)}")
        tensors = ckpt.load_training_tensors(path)
        try:
            optim_sd = ckpt.unflatten_optimizer(tensors, state["optimizer"])
            if self.sharded:
                weights = ckpt.read_weights(path)
                distributed.load_full_state(self.model, self.optimizer, weights, optim_sd)
            else:
                ckpt.load_weights(self.model, path)
                self.optimizer.load_state_dict(optim_sd)
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            self.best_val_loss = state.get("best_val_loss")
            self.elapsed = float(state.get("elapsed", 0.0))
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            if self.dist.enabled:
                r = self.dist.rank
                rng = state["rng_ranks"][r]
                torch.set_rng_state(tensors[f"rng.rank{r}.torch"])
                if self.device.type == "cuda" and f"rng.rank{r}.cuda" in tensors:
                    torch.cuda.set_rng_state(tensors[f"rng.rank{r}.cuda"], self.device)
            else:
                rng = state
                torch.set_rng_state(tensors["rng.torch"])
                cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
                if cuda_states and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
            random.setstate(_tupled(rng["rng_python"]))
            kind, keys, *rest = rng["rng_numpy"]
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
        """The loss over the fixed validation windows. In several processes each rank runs
        ``eval_iters`` batches (as many forwards on every rank, as FSDP needs), and the sums
        are added up over the ranks."""
        self.model.eval()
        bs, world, rank = self.cfg.batch_size, self.dist.world_size, self.dist.rank
        starts = eval_starts(len(self.val_tokens), self.seq_len,
                             self.cfg.eval_iters * bs * world,  # eval_iters batches a rank
                             rows=self.val_mask is not None)
        batches = [starts[i:i + bs] for i in range(0, len(starts), bs)]
        sums = torch.zeros(2, device=self.device)  # summed loss, tokens
        for i in range(rank, math.ceil(len(batches) / world) * world, world):
            x, y = batch_at(self.val_tokens, batches[min(i, len(batches) - 1)], self.seq_len,
                            self.val_mask)
            with self.precision.autocast(self.device):
                _, loss = self.model(x.to(self.device), y.to(self.device), reduction="sum")
            if i < len(batches):  # past the end: a repeated batch, run but not counted
                sums[0] += loss.float()
                sums[1] += (y != -1).sum()
        self.model.train()
        total, count = distributed.total(sums).tolist()
        return total / count

    def _train_step(self, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.cfg.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        non_blocking = self.device.type == "cuda"
        for micro in range(accum):
            x, y = self.sampler.next_batch(self.cfg.batch_size)
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            # in several processes, gradients are reduced on the last micro-step only
            with distributed.sync_gradients(self.train_model, self.cfg.strategy,
                                            micro == accum - 1):
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
        """The job's tokens/s against the peak of all its devices (one per rank)."""
        if not self.flops_per_token or not self.peak_flops:
            return None
        achieved = tokens_per_sec * self.flops_per_token / self.dist.world_size
        # a CPU's peak is one matmul timed at start-up, low if the machine was busy then:
        # the peak is the most this device has been seen to do, so never over 100%
        self.peak_flops = max(self.peak_flops, achieved)
        return achieved / self.peak_flops

    def fit(self) -> Finished:
        """Train to ``total_steps``; in several processes, a rank that dies makes the
        others raise ``PeerLost`` (within the process group's timeout) instead of hanging."""
        try:
            return self._fit()
        except (RuntimeError, MemoryError) as e:
            if distributed.is_peer_failure(e):
                raise distributed.lost(e, self.step, self.last_checkpoint) from e
            if is_out_of_memory(e):
                raise MiniGPTError(
                    f"out of memory on {self.device} at step {self.step + 1} (batches of "
                    f"{self.cfg.batch_size} windows of {self.seq_len} tokens)",
                    "lower train.batch_size (train.grad_accum_steps keeps the batch), "
                    "model.max_seq_length or the model's size") from e
            if self.cfg.compile and type(e).__module__.startswith(("torch._dynamo",
                                                                   "torch._inductor")):
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise MiniGPTError(f"train.compile: torch.compile failed ({why})",
                                   "train without train.compile") from e
            raise
        finally:
            layout.release_run_dir(self.run_dir)  # held since setup (``hold_run_dir``)

    def _fit(self) -> Finished:
        cfg = self.cfg
        global_batch = cfg.batch_size * cfg.grad_accum_steps * self.dist.world_size
        tokens_per_step = global_batch * self.seq_len
        self._emit(Started(self.step, self.total_steps, self.sampler.n_windows / global_batch,
                           tokens_per_step, len(self.train_tokens), len(self.val_tokens),
                           global_batch, self.dist.world_size))
        self.model.train()
        session_start = time.perf_counter()
        elapsed_before = self.elapsed
        last_log_time, last_log_step = session_start, self.step
        loss = lr = None
        while self.step < self.total_steps:
            # All ranks stop at one step. In several processes they agree on it at log steps
            # only (one all-reduce, a host sync on GPUs, per log interval instead of per step).
            check = not self.dist.enabled or self.step % cfg.log_interval == 0
            reason = distributed.largest(self._stop, self.device) if check else 0
            if reason:
                if self._saved_step == self.step:
                    raise TrainingStopped(self.step, self.last_checkpoint, reason)
                if loss is not None:
                    self._check_finite(distributed.mean(loss).item(), lr)
                raise TrainingStopped(self.step, self.save(), reason)
            lr = lr_at(self.step, cfg, self.total_steps)
            loss = self._train_step(lr)
            self.step += 1
            final = self.step == self.total_steps
            if self.step % cfg.log_interval == 0 or final:
                # the job's loss (the mean over ranks); the only host sync between checkpoints
                loss_value = distributed.mean(loss).item()
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
                # never save a model that diverged
                self._check_finite(distributed.mean(loss).item(), lr)
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

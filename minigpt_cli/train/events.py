"""What the training loop reports, as plain data: a UI, a log or a test subscribes to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt_cli.run.history import MetricsLog


@dataclass
class Started:
    start_step: int
    total_steps: int
    steps_per_epoch: float
    tokens_per_step: int
    train_tokens: int
    val_tokens: int
    global_batch: int = 0  # windows per step: batch x grad_accum x world size
    world_size: int = 1


@dataclass
class Logged:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    tokens_per_sec: float
    elapsed: float
    mfu: float | None = None  # model FLOPs utilisation, where the device's peak is known


@dataclass
class Validated:
    step: int
    val_loss: float
    best_val_loss: float
    is_best: bool


@dataclass
class Saved:
    step: int
    path: Path
    best: bool


@dataclass
class Finished:
    step: int
    best_val_loss: float | None
    elapsed: float
    path: Path | None


Event = Started | Logged | Validated | Saved | Finished
Callback = Callable[[Event], None]


class MetricsWriter:
    """A callback that records ``Logged`` and ``Validated`` events in ``metrics.jsonl``,
    each training record with the job's global batch and number of processes."""

    def __init__(self, log: MetricsLog):
        self.log = log
        self.batch: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        record: dict[str, Any]
        if isinstance(event, Started):
            self.batch = {"global_batch": event.global_batch, "world_size": event.world_size}
            return
        if isinstance(event, Logged):
            record = {"step": event.step, "loss": round(event.loss, 6), "lr": event.lr,
                      "tokens_per_sec": round(event.tokens_per_sec, 1),
                      "epoch": round(event.epoch, 4), "elapsed": round(event.elapsed, 2)}
            if event.mfu is not None:
                record["mfu"] = round(event.mfu, 4)
            record.update(self.batch)
        elif isinstance(event, Validated):
            record = {"step": event.step, "val_loss": round(event.val_loss, 6)}
        else:
            return
        self.log.append(record)

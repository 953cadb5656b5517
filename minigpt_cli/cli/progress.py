"""Rendering training progress: a live Rich panel on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from minigpt_cli.cli.ui import err_console, human_count, human_duration
from minigpt_cli.train.events import Event, Finished, Logged, Saved, Started, Validated

if TYPE_CHECKING:
    import torch


class TrainingView:
    """Receives trainer events; call ``close()`` when training ends."""

    def __init__(self, console: Console, title: str, device: torch.device, precision: str,
                 num_params: int, trainable_params: int | None = None):
        self.console = console
        self.title = title
        self.device = device
        self.device_label = f"{device.type} · {precision}"
        self.num_params = num_params
        self.trainable_params = num_params if trainable_params is None else trainable_params
        self.live_mode = console.is_terminal
        self.stats: dict[str, str] = {}
        self.start_step = 0
        self.total = 1
        self.step = 0
        self.elapsed = 0.0
        self.session_start = time.perf_counter()
        self.best: float | None = None
        self.val: float | None = None
        self._bar = Progress(TextColumn("[bold]step"), BarColumn(bar_width=None),
                             MofNCompleteColumn(), expand=True)
        self._task = self._bar.add_task("train", total=1)
        self._live: Live | None = None

    # ---- events ---------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started):
            self._started(event)
        elif isinstance(event, Logged):
            self._logged(event)
        elif isinstance(event, Validated):
            self.val, self.best = event.val_loss, event.best_val_loss
            if not self.live_mode:
                mark = " (new best)" if event.is_best else f" (best {event.best_val_loss:.4f})"
                self.console.print(f"step {event.step:>6} | val loss {event.val_loss:.4f}{mark}")
            self._refresh()
        elif isinstance(event, Saved):
            self.stats["checkpoint"] = f"step {event.step}" + (" (best)" if event.best else "")
            self._refresh()
        elif isinstance(event, Finished):
            self.step = event.step
            self._refresh()

    def _started(self, e: Started) -> None:
        self.start_step, self.total, self.step = e.start_step, e.total_steps, e.start_step
        self.session_start = time.perf_counter()
        self._bar.update(self._task, total=e.total_steps, completed=e.start_step)
        params = f"{self.num_params:,} parameters"
        if self.trainable_params != self.num_params:  # LoRA: a frozen base
            params = (f"{self.trainable_params:,} trainable of {params} "
                      f"({self.trainable_params / self.num_params:.2%})")
        summary = (f"{params} · {human_count(e.train_tokens)} "
                   f"train / {human_count(e.val_tokens)} val tokens · {e.tokens_per_step:,} "
                   f"tokens/step · {e.steps_per_epoch:,.0f} steps/epoch")
        if e.world_size > 1:
            summary += (f" · global batch {e.global_batch} ({e.global_batch // e.world_size} "
                        f"a rank x {e.world_size} processes)")
        if self.live_mode:
            self.console.print(f"[dim]{summary}[/]")
            self._live = Live(self._render(), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.start()
        else:
            self.console.print(f"{self.title}: {summary}; device {self.device_label}; "
                               f"steps {e.start_step}->{e.total_steps}")

    def _logged(self, e: Logged) -> None:
        self.step, self.elapsed = e.step, e.elapsed
        mfu = "" if e.mfu is None else f" · MFU {e.mfu:.0%}"
        self.stats.update(epoch=f"{e.epoch:.2f}", loss=f"{e.loss:.4f}", lr=f"{e.lr:.2e}",
                          speed=f"{e.tokens_per_sec:,.0f} tokens/s{mfu}")
        if not self.live_mode:
            mfu = "" if e.mfu is None else f" (MFU {e.mfu:.0%})"
            self.console.print(
                f"step {e.step:>6}/{e.total_steps} | epoch {e.epoch:.2f} | loss {e.loss:.4f} | "
                f"lr {e.lr:.2e} | {e.tokens_per_sec:,.0f} tok/s{mfu} | "
                f"{human_duration(e.elapsed)} elapsed, ETA {human_duration(self._eta())}")
        self._refresh()

    # ---- rendering ------------------------------------------------------------------------

    def _eta(self) -> float:
        done = self.step - self.start_step
        if done <= 0:
            return 0.0
        spent = time.perf_counter() - self.session_start
        return spent / done * (self.total - self.step)

    def _render(self) -> Panel:
        self._bar.update(self._task, completed=self.step)
        table = Table.grid(padding=(0, 3))
        for _ in range(4):
            table.add_column()
        val = "—" if self.val is None else f"{self.val:.4f}"
        best = "—" if self.best is None else f"{self.best:.4f}"
        rows = [
            ("epoch", self.stats.get("epoch", "—"), "train loss", self.stats.get("loss", "—")),
            ("val loss", val, "best val", best),
            ("lr", self.stats.get("lr", "—"), "speed", self.stats.get("speed", "—")),
            ("elapsed", human_duration(self.elapsed), "ETA", human_duration(self._eta())),
            ("device", self.device_label, "peak memory", _peak_memory(self.device)),
            ("checkpoint", self.stats.get("checkpoint", "—"), "", ""),
        ]
        for a, b, c, d in rows:
            table.add_row(f"[dim]{a}[/]", b, f"[dim]{c}[/]", d)
        return Panel(Group(self._bar, table), title=f"[bold]{self.title}[/]",
                     border_style="cyan", expand=True)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None


def _peak_memory(device: torch.device) -> str:
    """The GPU's peak allocation, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        import torch

        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    try:
        import resource
    except ImportError:  # Windows
        return "—"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    return f"{mib:,.0f} MiB (process)"


class DataProgress:
    """Shows tokenizer training and tokenization (bytes of text: MB/s and ETA); transient
    on a terminal.

    Use it as a context manager (it closes itself); ``DataProgress.on_terminal()`` is one
    that shows nothing unless stderr is a terminal.
    """

    def __init__(self, console: Console | None, enabled: bool = True):
        self.console = console
        self.enabled = enabled and console is not None
        self.current = None
        self._progress: Progress | None = None
        self._task = None

    @classmethod
    def on_terminal(cls, enabled: bool = True) -> DataProgress:
        return cls(err_console, enabled and err_console.is_terminal)

    def __enter__(self) -> DataProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.current:
            self.current = stage
            if self.console.is_terminal:
                if self._progress is not None and self._task is not None and any(
                        t.id == self._task and t.total is None for t in self._progress.tasks):
                    self._progress.remove_task(self._task)  # done: no 0% bar left behind
                if self._progress is None:
                    self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                              TextColumn("{task.percentage:>3.0f}%"),
                                              TransferSpeedColumn(), TextColumn("ETA"),
                                              TimeRemainingColumn(),
                                              console=self.console, transient=True)
                    self._progress.start()
                self._task = self._progress.add_task(stage, total=total or None)
            else:
                self.console.print(f"{stage}...")
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total or None)

    def for_stage(self, name: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback for one stage, or None when nothing is shown."""
        if not self.enabled:
            return None
        return lambda done, total: self(name, done, total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""A run's training history, ``metrics.jsonl``: appended to while training, read back
as series over steps.

Training appends one JSON object per logged step (``step, loss, lr, tokens_per_sec,
epoch, elapsed``, ``mfu`` where known) and one per validation (``step, val_loss``). A run
that is still training may have a half-written last line; unreadable lines are skipped
and counted. No printing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt_cli.errors import CheckpointError
from minigpt_cli.fileio import atomic_write_text
from minigpt_cli.run.layout import METRICS_FILE, check_run_dir, find_latest_run

TRAIN_KEYS = ("loss", "lr", "tokens_per_sec", "epoch", "elapsed")


class MetricsLog:
    """Appends records to a run's ``metrics.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (logged after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):  # a line torn by a crash (kill -9)
                pass
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))


@dataclass
class History:
    """Training records (one per logged step) and validation records, sorted by step."""

    run_dir: Path
    train: dict[str, list[float]] = field(default_factory=dict)  # "step" and TRAIN_KEYS
    val: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "val_loss": []})
    skipped_lines: int = 0

    def summary(self) -> dict[str, Any]:
        """Headline figures, all derived from the series."""
        t, v = self.train, self.val
        best = min(range(len(v["step"])), key=v["val_loss"].__getitem__, default=None)
        speeds = [s for s in t["tokens_per_sec"] if s > 0]
        return {
            "logged_steps": len(t["step"]),
            "last_step": max(t["step"][-1:] + v["step"][-1:], default=None),
            "final_loss": t["loss"][-1] if t["loss"] else None,
            "min_loss": min(t["loss"], default=None),
            "final_val_loss": v["val_loss"][-1] if v["val_loss"] else None,
            "best_val_loss": None if best is None else v["val_loss"][best],
            "best_val_step": None if best is None else v["step"][best],
            "final_lr": t["lr"][-1] if t["lr"] else None,
            "peak_lr": max(t["lr"], default=None),
            "mean_tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
            "elapsed": t["elapsed"][-1] if t["elapsed"] else None,
            "epochs": t["epoch"][-1] if t["epoch"] else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "summary": self.summary(), "train": self.train,
                "val": self.val, "skipped_lines": self.skipped_lines}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_history(run: Path | None) -> History:
    """The history of the run directory ``run`` (default: the latest run under runs/)."""
    run_dir = find_latest_run() if run is None else check_run_dir(Path(run), None, False)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}",
                              "it is written as the run trains; train it first")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    train: dict[int, dict[str, float]] = {}
    val: dict[int, float] = {}
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            skipped += 1
        elif _number(rec.get("val_loss")):
            val[step] = float(rec["val_loss"])
        elif all(_number(rec.get(k)) for k in ("loss", "lr")):
            train[step] = {k: float(rec[k]) if _number(rec.get(k)) else 0.0 for k in TRAIN_KEYS}
        else:
            skipped += 1
    if not train and not val:
        raise CheckpointError(f"{path} holds no training records yet",
                              "let the run log a few steps first")
    steps = sorted(train)  # a later record for the same step (after a resume) wins
    series: dict[str, list[float]] = {"step": steps}  # type: ignore[dict-item]
    for key in TRAIN_KEYS:
        series[key] = [train[s][key] for s in steps]
    vsteps = sorted(val)
    return History(run_dir, series, {"step": vsteps, "val_loss": [val[s] for s in vsteps]},
                   skipped)

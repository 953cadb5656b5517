"""The run directory: what it holds, where it is, and whether a folder is one.

A run directory describes itself::

    config.yaml                 the resolved config (vocab size included)
    tokenizer/                  the tokenizer's files and tokenizer.json (its spec)
    metrics.jsonl               one JSON object per logged step or validation
    eval.json                   results of evaluations
    checkpoints/step-0000500/   model.safetensors, training.safetensors, state.json
    checkpoints/latest.json     which step directory is the latest
    checkpoints/best.json       which step directory has the best validation loss

A LoRA run's ``model.safetensors`` holds its adapters only; its ``state.json`` records the
base model's path and the sha256 of its weights (``load.base_weights`` checks them).

Nothing here follows a path or a link out of the run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt_cli import paths
from minigpt_cli.errors import CheckpointError
from minigpt_cli.fileio import atomic_write_text

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CKPT_DIR = "checkpoints"
RUN_HINT = "pass a directory made by 'minigpt train'"


def inside(root: Path, path: Path) -> Path:
    """``path``, unless it (or a link on the way) leads out of ``root``."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise CheckpointError(f"{path} points outside {root}",
                              "a run directory must hold its own files; remove the link")
    return path


def check_new_run_dir(run_dir: Path) -> None:
    """Fail early, before any work, when ``run_dir`` cannot become a new run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"out {run_dir} is a file, not a directory",
                              "choose another run directory", setting="out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise CheckpointError(f"out {run_dir} already exists and is not empty",
                              "resume it, or choose another run directory", setting="out")
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {run_dir}: {parent} is not a writable directory",
                              "choose a writable run directory")


def create_run_dir(run_dir: Path) -> Path:
    """Make a new, empty run directory; an existing run is never overwritten."""
    check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to {run_dir}: {e.strerror or e}",
                              "choose a writable run directory") from e
    return run_dir


def write_run_files(run_dir: Path, config, tokenizer) -> None:
    """The files that describe a new run: its config and its tokenizer."""
    try:
        atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())
        tokenizer.save(run_dir / TOKENIZER_DIR)
    except OSError as e:
        raise CheckpointError(f"cannot write to {run_dir}: {e.strerror or e}",
                              "choose a writable run directory with free space") from e


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / CKPT_DIR).is_dir()


def check_run_dir(path: Path, setting: str | None = "model", checkpoint: bool = True) -> Path:
    """``path`` if it is a run directory (with a checkpoint, unless ``checkpoint`` is
    False), else a one-line error; ``setting`` names what gave the path, if anything."""
    if not path.exists():
        if setting is None:
            raise CheckpointError(f"run directory {path} does not exist", RUN_HINT)
        raise CheckpointError(f"{setting} {path} does not exist", RUN_HINT, setting=setting)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a minigpt run directory", RUN_HINT)
    if checkpoint and not (path / CKPT_DIR).is_dir():
        raise CheckpointError(f"{path} has no checkpoint yet",
                              "let its training reach a checkpoint, or resume it")
    return path


def find_latest_run(root: Path = paths.RUNS_DIR) -> Path:
    """The run under ``root`` whose latest checkpoint is the newest."""
    candidates = []
    if root.is_dir():
        for d in root.iterdir():
            pointer = d / CKPT_DIR / "latest.json"
            if pointer.is_file():
                candidates.append((pointer.stat().st_mtime, d))
    if not candidates:
        raise CheckpointError(f"no trained run found under {root}/",
                              "train one with 'minigpt train --preset tiny', or name a run "
                              "directory")
    return max(candidates)[1]

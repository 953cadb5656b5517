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
import shutil
from pathlib import Path

from minigpt_cli import paths
from minigpt_cli.errors import CheckpointError
from minigpt_cli.fileio import atomic_write_text

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CKPT_DIR = "checkpoints"
# what a new run writes before its first checkpoint (chat_template.json: a chat run's template)
NEW_RUN_FILES = (CONFIG_FILE, TOKENIZER_DIR, METRICS_FILE, CKPT_DIR, "chat_template.json")
RUN_HINT = "pass a directory made by 'minigpt train'"


def inside(root: Path, path: Path) -> Path:
    """``path``, unless it (or a link on the way) leads out of ``root``."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise CheckpointError(f"{path} points outside {root}",
                              "a run directory must hold its own files; remove the link")
    return path


# the run directories this process trains, each held by a lock on an open descriptor
_HELD: dict[str, int] = {}
BUSY_HINT = "wait for that training to end, or stop it (Ctrl-C saves a checkpoint)"


def _lock(run_dir: Path) -> int | None:
    """A descriptor of ``run_dir`` with an exclusive lock (``flock`` on the folder itself:
    no lock file), or None where locks are not available. BlockingIOError: another
    process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return None
    try:
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # a filesystem without locks
        os.close(fd)
        return None
    return fd


def hold_run_dir(run_dir: Path) -> None:
    """Claim ``run_dir`` for this process's training until ``release_run_dir`` (or the
    process's end, however it ends): another process that tries gets a CheckpointError,
    rather than two trainings writing checkpoints into one run. Again in this process:
    nothing (it holds it already)."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    try:
        fd = _lock(run_dir)
    except BlockingIOError:
        raise CheckpointError(f"{run_dir} is being trained by another process",
                              BUSY_HINT) from None
    if fd is not None:
        _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def _busy(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir`` (``hold_run_dir``)."""
    if os.path.realpath(run_dir) in _HELD:
        return False
    try:
        fd = _lock(run_dir)
    except BlockingIOError:
        return True
    if fd is not None:
        os.close(fd)
    return False


def check_new_run_dir(run_dir: Path) -> None:
    """Fail early, before any work, when ``run_dir`` cannot become a new run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"out {run_dir} is a file, not a directory",
                              "choose another run directory", setting="out")
    if run_dir.is_dir() and _busy(run_dir):
        raise CheckpointError(f"out {run_dir} is being trained by another process", BUSY_HINT,
                              setting="out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        hint = "resume it, or choose another run directory"
        if (run_dir / CONFIG_FILE).is_file() and not has_checkpoint(run_dir):  # kill -9, say
            hint = ("it is a run that stopped before its first checkpoint: remove it and train "
                    "again, or choose another run directory")
        raise CheckpointError(f"out {run_dir} already exists and is not empty", hint,
                              setting="out")
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


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run has saved a checkpoint (a step directory, or the pointer to one)."""
    ckpts = run_dir / CKPT_DIR
    return ckpts.is_dir() and any(p.name == "latest.json" or p.name.startswith("step-")
                                  for p in ckpts.iterdir())


def discard_new_run_dir(run_dir: Path, made: bool) -> None:
    """Take back a new run that failed (an error, Ctrl-C, SIGTERM) before its first
    checkpoint: the files it wrote in ``run_dir`` go, and ``run_dir`` too if the run ``made``
    it and nothing else is in it, so that the same command can run again. Nothing is lost: a
    run without a checkpoint cannot be resumed. A run with a checkpoint is left as it is."""
    try:
        if has_checkpoint(run_dir):
            return
        for name in NEW_RUN_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if made:
            run_dir.rmdir()
    except OSError:  # best effort (a folder with other files is kept): the failure matters more
        pass


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

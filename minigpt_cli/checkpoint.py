"""Run directories and checkpoints: the one place that reads or writes model files.

A run directory describes itself::

    config.yaml                 the resolved config (vocab size included)
    tokenizer/                  the tokenizer's files and tokenizer.json (its spec)
    metrics.jsonl               one JSON object per logged step or validation
    checkpoints/step-0000500/   model.safetensors, training.safetensors, state.json
    checkpoints/latest.json     which step directory is the latest
    checkpoints/best.json       which step directory has the best validation loss

Weights and optimizer tensors are safetensors, everything else JSON or YAML: loading
never unpickles anything. A step directory is written under a temporary name and renamed
into place, and the pointer files are replaced atomically, so a crash at any moment leaves
the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import minigpt_tokenizers
from minigpt_cli.config import Config
from minigpt_cli.errors import CheckpointError, ConfigError
from minigpt_cli.model import GPT

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"
TIED_KEYS = ("lm_head.weight",)  # the same tensor as transformer.wte.weight
_STEP_DIR = re.compile(r"^step-\d{7,}$")


# ---- atomic file helpers -----------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename, so readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---- run directories ---------------------------------------------------------------------

def create_run_dir(run_dir: Path) -> Path:
    """Make a new, empty run directory; an existing run is never overwritten."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} already exists and is not empty",
                              "pass --resume to continue it, or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to {run_dir}: {e.strerror or e}",
                              "choose a writable --out directory") from e
    return run_dir


def write_run_files(run_dir: Path, config: Config, tokenizer) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())
    tokenizer.save(run_dir / TOKENIZER_DIR)


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / CKPT_DIR).is_dir()


def find_latest_run(root: Path = Path("runs")) -> Path:
    """The run under ``root`` whose latest checkpoint is the newest."""
    candidates = []
    if root.is_dir():
        for d in root.iterdir():
            pointer = d / CKPT_DIR / "latest.json"
            if pointer.is_file():
                candidates.append((pointer.stat().st_mtime, d))
    if not candidates:
        raise CheckpointError(f"no trained run found under {root}/",
                              "train one with 'minigpt train --preset tiny' or pass --model DIR")
    return max(candidates)[1]


def load_config(run_dir: Path) -> Config:
    try:
        return Config.from_file(run_dir / CONFIG_FILE).validate()
    except ConfigError as e:
        raise CheckpointError(f"{run_dir} has an unusable config: {e}") from e


def load_tokenizer(run_dir: Path):
    return minigpt_tokenizers.load(run_dir / TOKENIZER_DIR)


# ---- checkpoints ---------------------------------------------------------------------------

def _pointer(run_dir: Path, which: str) -> Path | None:
    path = run_dir / CKPT_DIR / f"{which}.json"
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt") from e
    if not isinstance(name, str) or not _STEP_DIR.match(name):  # no path traversal
        raise CheckpointError(f"{path} points outside the run directory")
    return run_dir / CKPT_DIR / name


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path:
    """The step directory for ``best`` (falls back to ``latest``) or ``latest``."""
    path = _pointer(run_dir, which) or (_pointer(run_dir, "latest") if which == "best" else None)
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet",
                              "train it first (minigpt train --out DIR)")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {STATE_FILE})")
    return path


def save_checkpoint(run_dir: Path, step: int, model: GPT, state: dict[str, Any],
                    training_tensors: dict[str, torch.Tensor], best: bool) -> Path:
    """Write weights, training tensors and ``state`` for ``step``; update the pointers."""
    ckpts = run_dir / CKPT_DIR
    ckpts.mkdir(exist_ok=True)
    final = ckpts / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=".tmp-"))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if k not in TIED_KEYS}
        save_file(weights, str(tmp / MODEL_FILE))
        save_file({k: v.detach().cpu().contiguous() for k, v in training_tensors.items()},
                  str(tmp / TRAINING_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        if final.exists():  # saved twice at one step (e.g. best and periodic): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpts / "latest.json", json.dumps({"dir": final.name, "step": step}))
    if best:
        atomic_write_text(ckpts / "best.json", json.dumps({"dir": final.name, "step": step}))
    _prune(run_dir)
    return final


def _prune(run_dir: Path) -> None:
    """Keep only the step directories that ``latest`` and ``best`` point to."""
    keep = {p.name for p in (_pointer(run_dir, "latest"), _pointer(run_dir, "best")) if p}
    for d in (run_dir / CKPT_DIR).iterdir():
        if d.is_dir() and (_STEP_DIR.match(d.name) or d.name.startswith(".tmp-")) \
                and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable or corrupt") from e


def _load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})",
                              "restore it or retrain the run") from e


def load_weights(model: GPT, ckpt: Path) -> None:
    weights = _load_tensors(ckpt / MODEL_FILE)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights in {ckpt} do not match the run's config: {first}") from e
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        raise CheckpointError(f"weights in {ckpt} do not match the run's config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_training_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(ckpt / TRAINING_FILE)


@dataclass
class LoadedRun:
    run_dir: Path
    config: Config
    tokenizer: Any
    model: GPT
    checkpoint: Path
    state: dict[str, Any]


def load_run(path: Path | None, device: torch.device | str = "cpu",
             which: str = "best") -> LoadedRun:
    """Model, tokenizer and config of a run, all from its directory, ready for inference."""
    run_dir = find_latest_run() if path is None else Path(path)
    if not run_dir.exists():
        raise CheckpointError(f"--model {run_dir} does not exist")
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a minigpt run directory",
                              "pass a directory made by 'minigpt train'")
    config = load_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    if config.model.vocab_size is None or config.model.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"{run_dir}: the model's vocab_size does not fit its tokenizer")
    ckpt = checkpoint_dir(run_dir, which)
    model = GPT(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(run_dir, config, tokenizer, model, ckpt, read_state(ckpt))


# ---- optimizer state as plain tensors + JSON ------------------------------------------------

def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}

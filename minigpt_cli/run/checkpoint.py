"""Checkpoints: the one place that writes or reads model and training tensors.

Weights and optimizer tensors are safetensors, everything else JSON: loading never
unpickles anything, and never follows a path or a link out of the run directory.

A checkpoint is written file by file (each fsynced) into a temporary directory; its
manifest, ``state.json``, goes last and records the size and sha256 of the other files.
The directory is then renamed into place, and only after that are the pointer files
replaced atomically. A crash or ``kill -9`` at any moment therefore leaves the pointers on
a complete checkpoint. Loading checks every file against the manifest, so a file that was
truncated or damaged afterwards is reported instead of loaded; ``--resume`` then falls back
to the newest older checkpoint that is intact (``train.keep_last`` keeps more of them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from minigpt_cli.errors import CheckpointError
from minigpt_cli.fileio import DIR_MODE, atomic_write_text, fsync_dir, write_synced
from minigpt_cli.model import lora
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run.layout import CKPT_DIR, inside

MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"  # written last: the manifest of the step directory
TIED_KEYS = ("lm_head.weight",)  # the same tensor as transformer.wte.weight
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_LEFTOVER = (".tmp-", ".old-")  # prefixes of directories a crash may leave behind


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- checkpoints ---------------------------------------------------------------------------

def _tied(sd: dict[str, torch.Tensor], key: str) -> bool:
    """Whether ``key`` is the token embedding under a second name (a tied head; in a
    gathered state dict it may be an equal copy)."""
    wte, t = sd.get("transformer.wte.weight"), sd[key]
    return wte is not None and t.shape == wte.shape and (
        t.data_ptr() == wte.data_ptr() or bool(torch.equal(t.cpu(), wte.cpu())))


def _step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m[1]) if m else None


def _pointer(run_dir: Path, which: str) -> Path | None:
    path = run_dir / CKPT_DIR / f"{which}.json"
    if not path.is_file():
        return None
    hint = "delete it; resuming then uses the newest intact checkpoint"
    try:
        name = json.loads(path.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt", hint) from e
    if not isinstance(name, str):
        raise CheckpointError(f"{path} is corrupt", hint)
    if _step_of(name) is None:  # only step-NNNNNNN is followed: no path traversal
        where = os.path.normpath(os.path.join(CKPT_DIR, name))
        if os.path.isabs(name) or where == os.pardir or where.startswith(os.pardir + os.sep):
            raise CheckpointError(f"{path} points outside the run directory", hint)
        raise CheckpointError(f"{path} names {name!r}, which is not a checkpoint of this "
                              "run (step-NNNNNNN)", hint)
    return inside(run_dir, run_dir / CKPT_DIR / name)


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path:
    """The step directory for ``best`` (falls back to ``latest``) or ``latest``."""
    path = _pointer(run_dir, which)
    if path is None and which == "best":
        which, path = "latest", _pointer(run_dir, "latest")
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet",
                              "train it first")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist ({which}.json names "
                              "it)", f"restore it from a backup, or delete "
                              f"{run_dir / CKPT_DIR / which}.json")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {STATE_FILE})")
    return path


def step_dirs(run_dir: Path) -> list[Path]:
    """Every step directory of a run, newest first."""
    ckpts = run_dir / CKPT_DIR
    if not ckpts.is_dir():
        return []
    found = [d for d in ckpts.iterdir() if _step_of(d.name) is not None and d.is_dir()]
    return sorted(found, key=lambda d: _step_of(d.name), reverse=True)


def resume_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The checkpoint to continue from and a note for each damaged one skipped: the latest,
    or when it does not pass :func:`verify` the newest older one that does."""
    notes: list[str] = []
    try:
        latest = _pointer(run_dir, "latest")
    except CheckpointError as e:
        latest = None
        notes.append(str(e))
    newest = _step_of(latest.name) if latest else None
    older = [d for d in step_dirs(run_dir)
             if d != latest and (newest is None or _step_of(d.name) < newest)]
    for candidate in ([latest] if latest else []) + older:
        try:
            verify(candidate, MODEL_FILE, TRAINING_FILE)
            return candidate, notes
        except CheckpointError as e:
            notes.append(f"skipped {candidate.name}: {e.message}")
    if notes:
        raise CheckpointError(f"no intact checkpoint to resume from in {run_dir} "
                              f"({notes[-1]})", "restore the damaged files from a backup, or "
                              "start a new run (train.keep_last keeps more checkpoints)")
    raise CheckpointError(f"{run_dir} has no checkpoint to resume from",
                          f"it stopped before its first one: remove {run_dir} and train again")


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes."""
    return run_dir / CKPT_DIR / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: GPT | dict[str, torch.Tensor],
                    state: dict[str, Any], training_tensors: dict[str, torch.Tensor],
                    best: bool, keep_last: int = 0) -> Path:
    """Write weights (of ``model``, or a state dict: a sharded model's, gathered), training
    tensors and ``state`` for ``step``; update the pointers; keep
    the latest, the best and ``keep_last`` older checkpoints. A failure to write (a full
    disk, say) is a ``CheckpointError`` and leaves the previous checkpoint as it was."""
    ckpts = run_dir / CKPT_DIR
    final = step_dir(run_dir, step)
    tmp: Path | None = None
    try:
        ckpts.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=_LEFTOVER[0]))
        tmp.chmod(DIR_MODE)
        sd = model if isinstance(model, dict) else model.state_dict()
        weights = {k: v.detach().cpu().contiguous() for k, v in sd.items()
                   if not (k in TIED_KEYS and _tied(sd, k))}
        if not all(v.isfinite().all() for v in weights.values() if v.is_floating_point()):
            raise CheckpointError(f"the weights at step {step} are not finite (training "
                                  f"diverged); nothing saved; {_last_good(run_dir)}",
                                  "start a new run with a lower train.learning_rate")
        training = {k: v.detach().cpu().contiguous() for k, v in training_tensors.items()}
        files = {}
        for name, tensors in ((MODEL_FILE, weights), (TRAINING_FILE, training)):
            data = safetensors_bytes(tensors)
            write_synced(tmp / name, data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            del data
        manifest = json.dumps({"step": step, **state, "files": files}, indent=1)
        write_synced(tmp / STATE_FILE, manifest.encode())
        fsync_dir(tmp)
        _move_into_place(tmp, final)
        tmp = None
        fsync_dir(ckpts)
        pointer = json.dumps({"dir": final.name, "step": step})
        atomic_write_text(ckpts / "latest.json", pointer)
        if best:
            atomic_write_text(ckpts / "best.json", pointer)
    except OSError as e:
        # without a checkpoint, `minigpt train` takes the new run back (nothing to resume)
        then = f"resume {run_dir}" if step_dirs(run_dir) else "train again"
        raise CheckpointError(
            f"could not save the checkpoint of step {step} in {ckpts}: {e.strerror or e}; "
            f"{_last_good(run_dir)}", f"free some disk space, then {then}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(run_dir, keep_last)
    return final


def _last_good(run_dir: Path) -> str:
    try:
        last = _pointer(run_dir, "latest")
    except CheckpointError:
        last = None
    return f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # saved again at the same step: move the old copy aside first
        aside = final.with_name(f"{_LEFTOVER[1]}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _prune(run_dir: Path, keep_last: int = 0) -> None:
    """Keep the step directories ``latest`` and ``best`` point to and the ``keep_last``
    newest ones before ``latest``; remove the rest and whatever a crash left behind."""
    try:
        latest, best = _pointer(run_dir, "latest"), _pointer(run_dir, "best")
    except CheckpointError:  # a pointer edited by hand: delete nothing
        return
    keep = {p.name for p in (latest, best) if p}
    if latest is not None and keep_last > 0:
        newest = _step_of(latest.name)
        older = [d.name for d in step_dirs(run_dir)
                 if d.name not in keep and _step_of(d.name) < newest]
        keep.update(older[:keep_last])
    for d in (run_dir / CKPT_DIR).iterdir():
        if d.name in keep or d.is_symlink():
            continue
        if d.is_dir() and (_step_of(d.name) is not None or d.name.startswith(_LEFTOVER)):
            shutil.rmtree(d, ignore_errors=True)
        elif d.name.startswith((".latest.json.", ".best.json.")):  # atomic_write_text's
            d.unlink(missing_ok=True)


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``: its step, training state and manifest."""
    path = inside(ckpt.parent.parent, ckpt / STATE_FILE)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist",
                              "restore it from a backup, or train the run again")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete ({STATE_FILE} is missing)",
                              "restore it from a backup, or train the run again") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt",
                              "restore it from a backup, or train the run again") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("files", {}), dict):
        raise CheckpointError(f"{path} is corrupt",
                              "restore it from a backup, or train the run again")
    return state


def verify(ckpt: Path, *names: str) -> dict[str, Any]:
    """Check files of a checkpoint against its manifest; return the state."""
    state = read_state(ckpt)
    for name in names:
        path = inside(ckpt.parent.parent, ckpt / name)
        hint = "restore it from a backup, or train the run again"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", hint)
        entry = state.get("files", {}).get(name)
        if entry is None:  # a checkpoint from before manifests: safetensors checks itself
            continue
        try:
            size, digest = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt", hint) from e
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} is truncated or damaged ({actual} bytes, the "
                                  f"manifest says {size})", hint)
        if _sha256(path) != digest:
            raise CheckpointError(f"{path} is corrupt (its sha256 does not match "
                                  f"{STATE_FILE})", hint)
    if TRAINING_FILE in names:  # what resuming reads besides the tensors
        several = isinstance(state.get("world_size"), int) and state["world_size"] > 1
        needed = {"sampler": dict, "optimizer": dict,
                  **({"rng_ranks": list} if several else
                     {"rng_python": list, "rng_numpy": list})}
        missing = [key for key, kind in needed.items() if not isinstance(state.get(key), kind)]
        if missing:
            raise CheckpointError(f"{ckpt / STATE_FILE} lacks its training state "
                                  f"({', '.join(missing)})", hint)
    return state


def _load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})",
                              "restore it or retrain the run") from e


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, checked against its manifest (the tied head included)."""
    verify(ckpt, MODEL_FILE)
    weights = _load_tensors(ckpt / MODEL_FILE)
    if "transformer.wte.weight" in weights:
        for key in TIED_KEYS:
            weights.setdefault(key, weights["transformer.wte.weight"])
    return weights


def load_weights(model: GPT, ckpt: Path) -> None:
    verify(ckpt, MODEL_FILE)
    weights = _load_tensors(ckpt / MODEL_FILE)
    try:
        lora.load_added_rows(model, weights)  # a LoRA run's new tokens (popped from weights)
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights in {ckpt} do not match the run's config: {first}",
                              "put back the config.yaml the run was trained with") from e
    missing = [k for k in missing if k not in TIED_KEYS]
    if lora.has_adapters(model):  # a LoRA run's checkpoints hold its adapters only
        missing = [k for k in missing if lora.is_adapter_key(k)]
    if missing or unexpected:
        raise CheckpointError(f"weights in {ckpt} do not match the run's config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                              "put back the config.yaml the run was trained with")


def load_training_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    verify(ckpt, TRAINING_FILE)
    return _load_tensors(ckpt / TRAINING_FILE)


# ---- optimizer state as plain tensors + JSON ------------------------------------------------

def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    return flatten_optimizer_state(opt.state_dict())


def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict (numbered parameters) as tensors and JSON."""
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

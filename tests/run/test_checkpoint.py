"""Checkpoints survive crashes and full disks, are never saved with broken weights, and
loading never runs code from a file."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minigpt_cli import fileio
from minigpt_cli.cli.app import app
from minigpt_cli.errors import CheckpointError, MiniGPTError
from minigpt_cli.run import checkpoint, load
from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingStopped

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(corpus, tmp_path, train_config,
                                                                untimed_records):
    run = prepare(train_config(corpus, "train.max_steps=16", "train.keep_last=2",
                               "train.eval_interval=100"), tmp_path / "run")
    run.trainer.fit()
    kept = sorted(d.name for d in checkpoint.step_dirs(tmp_path / "run"))
    assert kept == ["step-0000008", "step-0000012", "step-0000016"]  # latest + best + 2
    before = untimed_records(tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / "step-0000016" / checkpoint.TRAINING_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])

    again = prepare(train_config(corpus, "train.max_steps=16"), tmp_path / "run", resume=True)
    assert again.resumed_from.name == "step-0000012"
    assert "step-0000016" in again.notes[0] and "truncated" in again.notes[0]
    again.trainer.fit()  # writes step 16 again over the damaged copy
    assert untimed_records(tmp_path / "run") == before
    checkpoint.verify(checkpoint.checkpoint_dir(tmp_path / "run", "latest"), checkpoint.MODEL_FILE,
                checkpoint.TRAINING_FILE)


@pytest.mark.parametrize("field", ["sampler", "optimizer", "rng_numpy"])
def test_a_state_file_missing_a_field_falls_back_to_an_older_checkpoint(
        corpus, tmp_path, train_config, field):
    """A hand-edited (or otherwise damaged) ``state.json`` whose files still match its
    manifest, but that lacks part of the training state, is skipped like a damaged file."""
    run = prepare(train_config(corpus, "train.max_steps=8", "train.checkpoint_interval=4",
                               "train.keep_last=2", "train.eval_interval=100"),
                  tmp_path / "run")
    run.trainer.fit()
    state_file = tmp_path / "run" / "checkpoints" / "step-0000008" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    del state[field]
    state_file.write_text(json.dumps(state))
    again = prepare(train_config(corpus, "train.max_steps=8"), tmp_path / "run", resume=True)
    assert again.resumed_from.name == "step-0000004"
    assert "step-0000008" in again.notes[0] and f"lacks its training state ({field})" in \
        again.notes[0]
    again.trainer.fit()


class Crash(BaseException):
    """Stands in for kill -9 in the middle of writing a checkpoint."""


CRASH_POINTS = ["write_synced", "fsync_dir", "_move_into_place", "atomic_write_text"]


def test_a_crash_anywhere_in_a_save_leaves_a_loadable_checkpoint(corpus, tmp_path, monkeypatch,
                                                                 train_config, untimed_records,
                                                                 stop_after):
    steps = ("train.max_steps=8", "train.eval_interval=100")  # one save: at step 8
    reference = prepare(train_config(corpus, *steps), tmp_path / "reference")
    reference.trainer.fit()
    first = prepare(train_config(corpus, *steps), tmp_path / "first")
    stop_after(first, 4)
    with pytest.raises(TrainingStopped):
        first.trainer.fit()  # checkpoint at step 4; step 8 is saved below, and crashed

    crashed_at = 0
    while True:
        crashed_at += 1
        run_dir = tmp_path / f"crash-{crashed_at}"
        shutil.copytree(tmp_path / "first", run_dir)
        run = prepare(train_config(corpus, *steps), run_dir, resume=True)
        calls: list[int] = []
        with monkeypatch.context() as m:
            m.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # a crash cleans nothing
            for name in CRASH_POINTS:
                real = getattr(checkpoint, name)

                def op(*args, _real=real, _calls=calls, _at=crashed_at, **kwargs):
                    _calls.append(1)
                    if len(_calls) == _at:
                        if _real is fileio.write_synced:  # half a file, then the crash
                            Path(args[0]).write_bytes(args[1][: len(args[1]) // 2])
                        raise Crash
                    return _real(*args, **kwargs)
                m.setattr(checkpoint, name, op)
            try:
                run.trainer.fit()
                break  # every write point has been crashed at once
            except Crash:
                pass
        load.load_run(run_dir)
        if checkpoint.resume_checkpoint(run_dir)[0].name != "step-0000008":
            resumed = prepare(train_config(corpus, *steps), run_dir, resume=True)
            assert resumed.trainer.step == 4
            resumed.trainer.fit()
            assert not [p for p in (run_dir / "checkpoints").iterdir()
                        if p.name.startswith(".")]  # the next save cleared the debris
        assert untimed_records(run_dir) == untimed_records(tmp_path / "reference"), crashed_at
    assert crashed_at > 6


def test_a_full_disk_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, train_config,
                                                   stop_after):
    run = prepare(train_config(corpus, "train.max_steps=8"), tmp_path / "run")
    stop_after(run, 4)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    with monkeypatch.context() as m:
        def full(path, data):
            Path(path).write_bytes(data[:10])
            raise OSError(28, "No space left on device")
        m.setattr(checkpoint, "write_synced", full)
        run = prepare(train_config(corpus, "train.max_steps=8"), tmp_path / "run", resume=True)
        with pytest.raises(CheckpointError, match="No space left.*step-0000004") as e:
            run.trainer.fit()
        assert f"then resume {tmp_path / 'run'}" in e.value.hint
    assert [d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir()] == \
        ["step-0000004"]  # no half-written directory left
    assert load.load_run(tmp_path / "run").state["step"] == 4
    run = prepare(train_config(corpus, "train.max_steps=8"), tmp_path / "run", resume=True)
    assert run.trainer.fit().step == 8


def test_non_finite_weights_are_never_saved(corpus, tmp_path, train_config):
    run = prepare(train_config(corpus, "train.max_steps=4"), tmp_path / "run")
    with torch.no_grad():
        run.trainer.model.transformer.wte.weight[3, 3] = float("inf")
    with pytest.raises(CheckpointError, match="not finite"):
        run.trainer.save()
    assert checkpoint.step_dirs(tmp_path / "run") == []


class Payload:
    """Unpickling this creates ``marker``: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


PLANTS = ["model.safetensors", "training.safetensors", "state.json", "config.yaml",
          "tokenizer.json"]


@pytest.mark.parametrize("where", PLANTS)
def test_a_planted_pickle_is_refused_and_never_runs(where, corpus, tmp_path, train_config):
    run = prepare(train_config(corpus, "train.max_steps=4"), tmp_path / "run")
    run.trainer.fit()
    marker = tmp_path / "pwned"
    payload_path = tmp_path / "payload.pt"
    torch.save({"weights": Payload(marker)}, payload_path)
    payload = payload_path.read_bytes()
    pickle.loads(pickle.dumps(Payload(tmp_path / "live")))
    assert (tmp_path / "live").exists()  # the payload is live: unpickling it runs code

    run_dir = tmp_path / "run"
    step = checkpoint.checkpoint_dir(run_dir, "latest")
    # every file a loader might read, plus the names other tools would try
    for name in ("pytorch_model.bin", "model.pt", "ckpt.pt", "optimizer.pt"):
        (step / name).write_bytes(payload)
        (run_dir / name).write_bytes(payload)
    if where == "config.yaml":
        (run_dir / where).write_text(f"!!python/object/apply:pathlib.Path.touch [{marker}]\n")
    elif where == "tokenizer.json":
        (run_dir / "tokenizer" / where).write_bytes(payload)
    else:
        (step / where).write_bytes(payload)
        if where != checkpoint.STATE_FILE:  # a crafted run updates its manifest to match
            state = json.loads((step / checkpoint.STATE_FILE).read_text())
            state["files"][where] = {"size": len(payload),
                                     "sha256": hashlib.sha256(payload).hexdigest()}
            (step / checkpoint.STATE_FILE).write_text(json.dumps(state))

    inference_reads_it = where != checkpoint.TRAINING_FILE  # optimizer state: for resuming only
    if inference_reads_it:
        with pytest.raises(MiniGPTError):
            load.load_run(run_dir)
    with pytest.raises(MiniGPTError):
        prepare(train_config(corpus, "train.max_steps=8"), run_dir, resume=True,
                changed={"train.max_steps"}).trainer.fit()
    result = CliRunner().invoke(app, ["generate", "--model", str(run_dir), "--prompt", "a",
                                      "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == (1 if inference_reads_it else 0)
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def torch_loads_weights_only(path: Path) -> bool:
    """Every ``torch.load(...)`` call in ``path`` passes ``weights_only=True`` (which never
    unpickles objects)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in node.keywords):
                return False
    return True


def test_loaders_never_unpickle_or_load_unsafe_yaml():
    unsafe = ("torch.load(", "pickle.load", "import pickle", "yaml.load(", "unsafe_load",
              "yaml.Loader", "weights_only=False", "allow_pickle=True")
    paths = [*(REPO / "minigpt_cli").rglob("*.py"), *(REPO / "tokenizers").rglob("*.py")]
    assert len(paths) > 40  # every module of both packages, sub-packages included
    for path in paths:
        text = path.read_text()
        found = [u for u in unsafe if u in text]
        if found == ["torch.load("] and torch_loads_weights_only(path):
            found = []
        assert not found, path


@pytest.mark.parametrize(("made", "other_file", "checkpointed", "left"), [
    (True, False, False, None),  # the folder the run made goes
    (False, False, False, []),  # a folder that was there (empty) stays, empty
    (True, True, False, ["notes.txt"]),  # what the run did not write is never removed
    (True, False, True, ["checkpoints", "config.yaml", "metrics.jsonl", "tokenizer"]),
])
def test_a_new_run_that_failed_before_its_first_checkpoint_is_taken_back(
        tmp_path, made, other_file, checkpointed, left):
    from minigpt_cli.chat.template import TEMPLATE_FILE
    from minigpt_cli.run import layout

    run_dir = layout.create_run_dir(tmp_path / "run")
    (run_dir / layout.CONFIG_FILE).write_text("model: {}\n")
    (run_dir / layout.TOKENIZER_DIR).mkdir()
    (run_dir / layout.TOKENIZER_DIR / "tokenizer.json").write_text("{}")
    (run_dir / layout.METRICS_FILE).write_text('{"step": 1, "loss": 5.0}\n')
    (run_dir / layout.CKPT_DIR).mkdir()
    if checkpointed:
        (run_dir / layout.CKPT_DIR / "step-0000004").mkdir()
    else:  # a chat run's template (here only where it would go)
        (run_dir / TEMPLATE_FILE).write_text("{}")
    if other_file:
        (run_dir / "notes.txt").write_text("mine")
    layout.discard_new_run_dir(run_dir, made)
    assert (sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None) == left


def test_an_atomic_write_that_cannot_start_names_the_file_not_its_temporary(tmp_path,
                                                                             monkeypatch):
    import errno
    import tempfile

    from minigpt_cli.fileio import atomic_write_text

    def read_only(*args, **kwargs):  # what a read-only filesystem answers
        raise OSError(errno.EROFS, "Read-only file system",
                      str(tmp_path / ".metrics.jsonl.abc123.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
    assert e.value.filename == str(tmp_path / "metrics.jsonl")
    assert e.value.errno == errno.EROFS and e.value.strerror == "Read-only file system"

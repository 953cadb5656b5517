"""Checkpoints survive crashes, resume is exact after any interruption, divergence stops
training before a broken model is saved, and loading never runs code from a file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import minigpt_tokenizers
from minigpt_cli import fileio
from minigpt_cli.cli.app import app
from minigpt_cli.config import Config
from minigpt_cli.errors import CheckpointError, MiniGPTError
from minigpt_cli.run import checkpoint, layout, load
from minigpt_cli.train import setup
from minigpt_cli.train.events import Saved
from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingDiverged, TrainingStopped

TOY = ["model.max_seq_length=32", "model.embed_dim=32", "model.num_heads=2",
       "model.num_layers=1", "model.ff_dim=64", "model.dropout=0.1", "train.batch_size=4",
       "train.log_interval=1", "train.eval_interval=5", "train.eval_iters=1",
       "train.checkpoint_interval=4", "train.warmup_steps=3", "train.learning_rate=3e-3",
       "train.device=cpu"]
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(write_corpus) -> Path:
    return write_corpus(lines=400)


def config(corpus: Path, *extra: str) -> Config:
    return Config.from_sources("tiny", overrides=[f"data.dataset={corpus}", *TOY, *extra])


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure time."""
    lines = (run_dir / layout.METRICS_FILE).read_text().splitlines()
    timing = ("tokens_per_sec", "elapsed", "mfu")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def stop_after(run, steps: int):
    """Ask ``run``'s trainer to stop once it has logged ``steps`` more steps."""
    seen = []

    def callback(event):
        if type(event).__name__ == "Logged":
            seen.append(event.step)
            if len(seen) == steps:
                run.trainer.request_stop()
    run.trainer.callbacks.append(callback)


# ---- exact resume, in process ---------------------------------------------------------------

def test_stopping_at_every_step_and_resuming_is_exact(corpus, tmp_path):
    full = prepare(config(corpus, "train.max_steps=11"), tmp_path / "full")
    full.trainer.fit()
    run = prepare(config(corpus, "train.max_steps=11"), tmp_path / "part")
    while True:  # one step per session: every step is a resume point
        stop_after(run, 1)
        try:
            run.trainer.fit()
            break
        except TrainingStopped:
            run = prepare(config(corpus, "train.max_steps=11"), tmp_path / "part", resume=True)
    assert records(tmp_path / "part") == records(tmp_path / "full")
    assert len([r for r in records(tmp_path / "full") if "loss" in r]) == 11


def test_a_metrics_line_torn_by_a_crash_is_dropped_on_resume(corpus, tmp_path):
    full = prepare(config(corpus, "train.max_steps=6"), tmp_path / "full")
    full.trainer.fit()
    run = prepare(config(corpus, "train.max_steps=6"), tmp_path / "part")
    stop_after(run, 5)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    with (tmp_path / "part" / layout.METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "loss": 4.2')  # kill -9 in the middle of a write
    prepare(config(corpus, "train.max_steps=6"), tmp_path / "part", resume=True).trainer.fit()
    assert records(tmp_path / "part") == records(tmp_path / "full")


def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(corpus, tmp_path):
    run = prepare(config(corpus, "train.max_steps=16", "train.keep_last=2",
                         "train.eval_interval=100"), tmp_path / "run")
    run.trainer.fit()
    kept = sorted(d.name for d in checkpoint.step_dirs(tmp_path / "run"))
    assert kept == ["step-0000008", "step-0000012", "step-0000016"]  # latest + best + 2
    before = records(tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / "step-0000016" / checkpoint.TRAINING_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])

    again = prepare(config(corpus, "train.max_steps=16"), tmp_path / "run", resume=True)
    assert again.resumed_from.name == "step-0000012"
    assert "step-0000016" in again.notes[0] and "truncated" in again.notes[0]
    again.trainer.fit()  # writes step 16 again over the damaged copy
    assert records(tmp_path / "run") == before
    checkpoint.verify(checkpoint.checkpoint_dir(tmp_path / "run", "latest"), checkpoint.MODEL_FILE,
                checkpoint.TRAINING_FILE)


class Crash(BaseException):
    """Stands in for kill -9 in the middle of writing a checkpoint."""


CRASH_POINTS = ["write_synced", "fsync_dir", "_move_into_place", "atomic_write_text"]


def test_a_crash_anywhere_in_a_save_leaves_a_loadable_checkpoint(corpus, tmp_path,
                                                                  monkeypatch):
    steps = ("train.max_steps=8", "train.eval_interval=100")  # one save: at step 8
    reference = prepare(config(corpus, *steps), tmp_path / "reference")
    reference.trainer.fit()
    first = prepare(config(corpus, *steps), tmp_path / "first")
    stop_after(first, 4)
    with pytest.raises(TrainingStopped):
        first.trainer.fit()  # checkpoint at step 4; step 8 is saved below, and crashed

    crashed_at = 0
    while True:
        crashed_at += 1
        run_dir = tmp_path / f"crash-{crashed_at}"
        shutil.copytree(tmp_path / "first", run_dir)
        run = prepare(config(corpus, *steps), run_dir, resume=True)
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
            resumed = prepare(config(corpus, *steps), run_dir, resume=True)
            assert resumed.trainer.step == 4
            resumed.trainer.fit()
            assert not [p for p in (run_dir / "checkpoints").iterdir()
                        if p.name.startswith(".")]  # the next save cleared the debris
        assert records(run_dir) == records(tmp_path / "reference"), crashed_at
    assert crashed_at > 6


def test_a_full_disk_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    run = prepare(config(corpus, "train.max_steps=8"), tmp_path / "run")
    stop_after(run, 4)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    with monkeypatch.context() as m:
        def full(path, data):
            Path(path).write_bytes(data[:10])
            raise OSError(28, "No space left on device")
        m.setattr(checkpoint, "write_synced", full)
        run = prepare(config(corpus, "train.max_steps=8"), tmp_path / "run", resume=True)
        with pytest.raises(CheckpointError, match="No space left.*step-0000004") as e:
            run.trainer.fit()
        assert f"then resume {tmp_path / 'run'}" in e.value.hint
    assert [d.name for d in (tmp_path / "run" / "checkpoints").iterdir() if d.is_dir()] == \
        ["step-0000004"]  # no half-written directory left
    assert load.load_run(tmp_path / "run").state["step"] == 4
    run = prepare(config(corpus, "train.max_steps=8"), tmp_path / "run", resume=True)
    assert run.trainer.fit().step == 8


# ---- divergence -------------------------------------------------------------------------------

def test_a_nan_loss_stops_before_a_broken_model_is_saved(corpus, tmp_path):
    run = prepare(config(corpus, "train.max_steps=20", "train.log_interval=10",
                         "train.eval_interval=100"), tmp_path / "run")
    model = run.trainer.model

    def poison(event):
        if isinstance(event, Saved) and event.step == 4:
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(float("nan"))
    run.trainer.callbacks.append(poison)
    with pytest.raises(TrainingDiverged) as e:
        run.trainer.fit()
    message = e.value.message
    assert "loss became nan by step 8" in message and "lr " in message
    assert "step-0000004" in message  # the last good checkpoint
    assert [d.name for d in checkpoint.step_dirs(tmp_path / "run")] == ["step-0000004"]
    loaded = load.load_run(tmp_path / "run")
    assert all(p.isfinite().all() for p in loaded.model.parameters())


def test_non_finite_weights_are_never_saved(corpus, tmp_path):
    run = prepare(config(corpus, "train.max_steps=4"), tmp_path / "run")
    with torch.no_grad():
        run.trainer.model.transformer.wte.weight[3, 3] = float("inf")
    with pytest.raises(CheckpointError, match="not finite"):
        run.trainer.save()
    assert checkpoint.step_dirs(tmp_path / "run") == []


# ---- security ---------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates ``marker``: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


PLANTS = ["model.safetensors", "training.safetensors", "state.json", "config.yaml",
          "tokenizer.json"]


@pytest.mark.parametrize("where", PLANTS)
def test_a_planted_pickle_is_refused_and_never_runs(where, corpus, tmp_path):
    run = prepare(config(corpus, "train.max_steps=4"), tmp_path / "run")
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
        prepare(config(corpus, "train.max_steps=8"), run_dir, resume=True,
                changed={"train.max_steps"}).trainer.fit()
    result = CliRunner().invoke(app, ["generate", "--model", str(run_dir), "--prompt", "a",
                                      "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == (1 if inference_reads_it else 0)
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_loaders_never_unpickle_or_load_unsafe_yaml():
    unsafe = ("torch.load(", "pickle.load", "import pickle", "yaml.load(", "unsafe_load",
              "yaml.Loader", "weights_only=False", "allow_pickle=True")
    for path in [*(REPO / "minigpt_cli").glob("*.py"), *(REPO / "tokenizers").glob("*.py")]:
        text = path.read_text()
        assert not [u for u in unsafe if u in text], path


def test_a_tokenizer_cannot_read_outside_its_folder(tmp_path):
    (tmp_path / "secret.tiktoken").write_text("YQ== 0\n")
    folder = tmp_path / "tok"
    folder.mkdir()
    meta = {"name": "tiktoken", "spec": "tiktoken", "pat_str": ".", "special_tokens": {}}
    for value in ("../secret.tiktoken", str(tmp_path / "secret.tiktoken")):
        (folder / "tokenizer.json").write_text(json.dumps({**meta, "ranks_file": value}))
        with pytest.raises(minigpt_tokenizers.TokenizerError, match="outside|must name"):
            minigpt_tokenizers.load(folder)
    (folder / "tokenizer.json").write_text(json.dumps(meta))  # the default file name ...
    (folder / "ranks.tiktoken").symlink_to(tmp_path / "secret.tiktoken")  # ... as a link out
    with pytest.raises(minigpt_tokenizers.TokenizerError, match="outside"):
        minigpt_tokenizers.load(folder)


# ---- signals, in process: the real handlers of `minigpt train`, signals sent at set steps ----

def _train_args(corpus: Path, out: str, steps: int) -> list[str]:
    return ["train", "--preset", "tiny", "--dataset", str(corpus), "--out", out,
            "--max-steps", str(steps), *[a for item in TOY for a in ("--set", item)]]


@pytest.fixture
def own_signal_handlers():
    """`minigpt train` keeps ignoring signals once one stopped it (the process is exiting);
    in process, put pytest's handlers back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(("how", "code"), [("Ctrl-C", 130), ("SIGTERM", 143),
                                           ("double Ctrl-C in a step", 130),
                                           ("double Ctrl-C in a save", 130)])
def test_a_signal_saves_or_leaves_and_resume_is_exact(how, code, corpus, tmp_path,
                                                      monkeypatch, own_signal_handlers):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, _train_args(corpus, "full", 14)).exit_code == 0
    real_prepare = setup.prepare

    def send(event):
        if type(event).__name__ != "Logged" or event.step != 9:
            return
        if how == "double Ctrl-C in a save":  # the second one lands inside the next save
            real_write = fileio.write_synced

            def write_then_signal(path, data):
                real_write(path, data)
                os.kill(os.getpid(), signal.SIGINT)
            monkeypatch.setattr(checkpoint, "write_synced", write_then_signal)
        os.kill(os.getpid(), signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        if how == "double Ctrl-C in a step":
            os.kill(os.getpid(), signal.SIGINT)

    def prepare_with_signals(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        run.trainer.callbacks.append(send)
        return run
    monkeypatch.setattr(setup, "prepare", prepare_with_signals)
    stopped = runner.invoke(app, _train_args(corpus, "part", 14))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    assert stopped.exit_code == code, stopped.output
    assert "Traceback" not in stopped.output
    assert "minigpt train --out part --resume" in stopped.stderr
    if how.startswith("double"):
        assert "Interrupted" in stopped.stderr
        assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()
                if p.name.startswith(".")] == []  # nothing half-written left behind
    else:
        assert "Stopped at step 9" in stopped.stderr
    resumed = runner.invoke(app, ["train", "--out", "part", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert records(tmp_path / "part") == records(tmp_path / "full")


# ---- kill -9, through the real command line ---------------------------------------------------

def _cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(cwd / "cache"), "COLUMNS": "200",
           "OMP_NUM_THREADS": "1"}  # the same numerics in every process, fast on busy CPUs
    return subprocess.Popen([sys.executable, "-m", "minigpt_cli", "train", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0 before the first)."""
    try:
        lines = (run_dir / layout.METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def _checkpointed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, ValueError):
        return 0


def _interrupt(proc: subprocess.Popen, run_dir: Path, at_step: int, how: str,
               rng: random.Random) -> tuple[int, str]:
    """Wait until training reaches ``at_step`` (and has a checkpoint), then interrupt."""
    deadline = time.monotonic() + 120
    while _progress(run_dir) < at_step or _checkpointed(run_dir) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not get going"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.02))
    if how == "kill -9":
        proc.kill()
    elif how == "double Ctrl-C":
        proc.send_signal(signal.SIGINT)
        time.sleep(rng.uniform(0, 0.005))
        proc.send_signal(signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _run_with_interruptions(tmp_path: Path, plan: list[str], seed: int) -> None:
    """Train a reference run, then the same run interrupted as ``plan`` says at random steps
    and resumed each time; both must log exactly the same losses."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i}: a quick brown fox jumps over the lazy dog\n"
                              for i in range(300)))
    steps = 25 * (len(plan) + 1)
    args = ["--preset", "tiny", "--dataset", str(corpus), "--max-steps", str(steps),
            "--set", "train.checkpoint_interval=3", "--set", "train.eval_interval=7",
            *[a for item in TOY if "checkpoint" not in item and "eval_interval" not in item
              for a in ("--set", item)]]
    reference = _cli(tmp_path, *args, "--out", "reference")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    rng = random.Random(seed)
    targets = sorted(rng.sample(range(5, steps - 10), len(plan)))
    run_dir = tmp_path / "run"
    for i, (how, target) in enumerate(zip(plan, targets, strict=True)):
        resume = ["--resume"] if i else []
        code, err = _interrupt(_cli(tmp_path, *args, "--out", "run", *resume), run_dir, target,
                               how, rng)
        assert "Traceback" not in err, (how, target, err)
        expected = {"kill -9": -signal.SIGKILL, "SIGTERM": 143}.get(how, 130)
        assert code == expected, (how, target, err)
        if how != "kill -9":
            assert "minigpt train --out run --resume" in err
        checkpoint.resume_checkpoint(run_dir)  # the last good checkpoint is loadable
    final = _cli(tmp_path, *args, "--out", "run", "--resume")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert f"Done: {steps} steps" in out
    assert records(run_dir) == records(tmp_path / "reference"), (plan, targets)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_killed_twice_then_resumed_logs_the_same_losses(tmp_path):
    _run_with_interruptions(tmp_path, ["kill -9", "kill -9"], seed=1)


@pytest.mark.slow
def test_interrupted_every_way_at_random_steps(tmp_path):
    plan = ["Ctrl-C", "kill -9", "SIGTERM", "kill -9", "double Ctrl-C", "kill -9", "kill -9"]
    _run_with_interruptions(tmp_path, plan, seed=int.from_bytes(os.urandom(2), "big"))

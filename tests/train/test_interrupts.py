"""Interrupted training: Ctrl-C, SIGTERM and kill -9, in process and through the real
command line, at set or random steps; resuming afterwards logs exactly the same losses.

The kill -9 tests draw their random steps from a seed they print and put in every failure
message; ``MINIGPT_TEST_SEED=N`` replays one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minigpt_cli import fileio
from minigpt_cli.cli.app import app
from minigpt_cli.run import checkpoint, layout
from minigpt_cli.train import setup

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(corpus: Path, out: str, steps: int, settings: list[str]) -> list[str]:
    return ["train", "--preset", "tiny", "--dataset", str(corpus), "--out", out,
            "--max-steps", str(steps), *[a for item in settings for a in ("--set", item)]]


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
def test_a_signal_saves_or_leaves_and_resume_is_exact(how, code, corpus, tmp_path, monkeypatch,
                                                      own_signal_handlers, untimed_records,
                                                      toy_train_settings):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, _train_args(corpus, "full", 14, toy_train_settings)).exit_code == 0
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
    stopped = runner.invoke(app, _train_args(corpus, "part", 14, toy_train_settings))
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
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")


@pytest.mark.parametrize(("how", "code", "says"), [
    ("SIGTERM", 143, "Terminated before training started."), ("Ctrl-C", 130, "Interrupted.")])
def test_a_signal_before_the_first_step_takes_the_new_run_back(how, code, says, corpus, tmp_path,
                                                               monkeypatch, own_signal_handlers,
                                                               toy_train_settings):
    """A signal after the run directory is made, while the model is built, leaves nothing
    that would block the same command."""
    from minigpt_cli.model import flops

    monkeypatch.chdir(tmp_path)
    args = _train_args(corpus, "run", 3, toy_train_settings)

    def signalled(*_):
        assert (tmp_path / "run" / layout.CONFIG_FILE).is_file()
        os.kill(os.getpid(), signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(flops, "peak_flops", signalled)
        stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == code, stopped.output
    assert stopped.stderr.strip() == says
    assert not (tmp_path / "run").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output


def test_training_goes_on_when_the_reader_of_its_output_is_gone(corpus, tmp_path, monkeypatch,
                                                               own_signal_handlers,
                                                               toy_train_settings):
    """`minigpt train | tee log`, and a Ctrl-C that ended tee too: the next line printed
    finds the pipe closed. Training goes on quietly, so it can still stop with a checkpoint."""
    import errno
    import io

    from rich.console import Console

    from minigpt_cli.cli import ui

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ui, "console", Console(file=ClosedPipe()))
    result = CliRunner().invoke(app, _train_args(corpus, "run", 6, toy_train_settings))
    assert result.exit_code == 0, (result.output, result.exception)
    assert checkpoint.checkpoint_dir(tmp_path / "run", "latest").name == "step-0000006"


# ---- kill -9, through the real command line ---------------------------------------------------

POLL_S = 0.02  # how often the kill tests look at the run's progress


@pytest.fixture
def interrupt_seed() -> int:
    """The seed of a kill test's random steps and delays: ``MINIGPT_TEST_SEED`` when set (to
    replay a failure), else a fresh one. Printed, and part of every failure message."""
    value = os.environ.get("MINIGPT_TEST_SEED")
    seed = int(value) if value else int.from_bytes(os.urandom(4), "big")
    print(f"kill test seed: {seed} (replay with MINIGPT_TEST_SEED={seed})")
    return seed


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
               rng: random.Random, tag: str) -> tuple[int, str]:
    """Wait until this process has trained to ``at_step`` (and there is a checkpoint), then
    interrupt. A resumed process counts only steps it logged itself: records left from the
    last session (past its checkpoint) must not make it look further on than it is, or the
    signal would land while Python is still starting."""
    started_ns = time.time_ns()
    at_step = max(at_step, _checkpointed(run_dir) + 1)
    metrics = run_dir / "metrics.jsonl"

    def logged_here() -> int:
        try:
            fresh = metrics.stat().st_mtime_ns >= started_ns
        except FileNotFoundError:
            return 0
        return _progress(run_dir) if fresh else 0

    deadline = time.monotonic() + 120
    while logged_here() < at_step or _checkpointed(run_dir) == 0:
        assert proc.poll() is None, (tag, proc.communicate())
        assert time.monotonic() < deadline, f"{tag}: training did not get going"
        time.sleep(POLL_S)
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


def _run_with_interruptions(tmp_path: Path, plan: list[str], seed: int, settings: list[str],
                            records) -> None:
    """Train a reference run, then the same run interrupted as ``plan`` says at random steps
    and resumed each time; both must log exactly the same losses."""
    tag = f"seed {seed} (replay with MINIGPT_TEST_SEED={seed})"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i}: a quick brown fox jumps over the lazy dog\n"
                              for i in range(300)))
    steps = 25 * (len(plan) + 1)
    args = ["--preset", "tiny", "--dataset", str(corpus), "--max-steps", str(steps),
            "--set", "train.checkpoint_interval=3", "--set", "train.eval_interval=7",
            *[a for item in settings if "checkpoint" not in item and "eval_interval" not in item
              for a in ("--set", item)]]
    reference = _cli(tmp_path, *args, "--out", "reference")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, (tag, err)

    rng = random.Random(seed)
    targets = sorted(rng.sample(range(5, steps - 10), len(plan)))
    run_dir = tmp_path / "run"
    for i, (how, target) in enumerate(zip(plan, targets, strict=True)):
        resume = ["--resume"] if i else []
        code, err = _interrupt(_cli(tmp_path, *args, "--out", "run", *resume), run_dir, target,
                               how, rng, tag)
        assert "Traceback" not in err, (tag, how, target, err)
        expected = {"kill -9": -signal.SIGKILL, "SIGTERM": 143}.get(how, 130)
        assert code == expected, (tag, how, target, err)
        if how != "kill -9":
            assert "minigpt train --out run --resume" in err, (tag, how, target, err)
        try:
            checkpoint.resume_checkpoint(run_dir)  # the last good checkpoint is loadable
        except Exception as e:
            raise AssertionError(f"{tag}: no loadable checkpoint after {how} at {target}") from e
    final = _cli(tmp_path, *args, "--out", "run", "--resume")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, (tag, err)
    assert f"Done: {steps} steps" in out, (tag, out)
    assert records(run_dir) == records(tmp_path / "reference"), (tag, plan, targets)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, (tag, leftovers)


def test_killed_twice_then_resumed_logs_the_same_losses(tmp_path, interrupt_seed,
                                                        toy_train_settings, untimed_records):
    _run_with_interruptions(tmp_path, ["kill -9", "kill -9"], interrupt_seed,
                            toy_train_settings, untimed_records)


@pytest.mark.slow
def test_interrupted_every_way_at_random_steps(tmp_path, interrupt_seed, toy_train_settings,
                                               untimed_records):
    plan = ["Ctrl-C", "kill -9", "SIGTERM", "kill -9", "double Ctrl-C", "kill -9", "kill -9"]
    _run_with_interruptions(tmp_path, plan, interrupt_seed, toy_train_settings,
                            untimed_records)

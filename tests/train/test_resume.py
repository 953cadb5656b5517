"""Resuming is exact after a stop at any step or a metrics line torn by a crash; a loss
that diverges stops training before a broken model is saved; a run that another process
trains is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minigpt_cli.run import checkpoint, layout, load
from minigpt_cli.train.events import Saved
from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingDiverged, TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stopping_at_every_step_and_resuming_is_exact(corpus, tmp_path, train_config,
                                                      untimed_records, stop_after):
    full = prepare(train_config(corpus, "train.max_steps=11"), tmp_path / "full")
    full.trainer.fit()
    run = prepare(train_config(corpus, "train.max_steps=11"), tmp_path / "part")
    while True:  # one step per session: every step is a resume point
        stop_after(run, 1)
        try:
            run.trainer.fit()
            break
        except TrainingStopped:
            run = prepare(train_config(corpus, "train.max_steps=11"), tmp_path / "part",
                          resume=True)
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")
    assert len([r for r in untimed_records(tmp_path / "full") if "loss" in r]) == 11


def test_a_metrics_line_torn_by_a_crash_is_dropped_on_resume(corpus, tmp_path, train_config,
                                                             untimed_records, stop_after):
    full = prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "full")
    full.trainer.fit()
    run = prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "part")
    stop_after(run, 5)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    with (tmp_path / "part" / layout.METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "loss": 4.2')  # kill -9 in the middle of a write
    prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "part", resume=True).trainer.fit()
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")


def test_a_nan_loss_stops_before_a_broken_model_is_saved(corpus, tmp_path, train_config):
    run = prepare(train_config(corpus, "train.max_steps=20", "train.log_interval=10",
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


@pytest.fixture
def held_elsewhere():
    """``held_elsewhere(run_dir)``: another process holds ``run_dir`` as a training does."""
    procs = []

    def hold(run_dir):
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from minigpt_cli.run import layout; layout.hold_run_dir(Path(sys.argv[1])); "
             "print('held', flush=True); sys.stdin.read()", str(run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.communicate("")


def test_a_run_another_process_trains_is_refused(corpus, tmp_path, train_config,
                                                 stop_after, held_elsewhere):
    from minigpt_cli.errors import CheckpointError

    run = prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "run")
    stop_after(run, 3)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    before = sorted(p.name for p in (tmp_path / "run" / layout.CKPT_DIR).iterdir())
    holder = held_elsewhere(tmp_path / "run")
    with pytest.raises(CheckpointError, match="being trained by another process"):
        prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match="being trained by another process"):
        prepare(train_config(corpus), tmp_path / "run")  # not "remove it and train again"
    assert sorted(p.name for p in (tmp_path / "run" / layout.CKPT_DIR).iterdir()) == before
    fresh = tmp_path / "fresh"  # a new run elsewhere, before its first checkpoint
    fresh.mkdir()
    (fresh / layout.CONFIG_FILE).write_text((tmp_path / "run" / layout.CONFIG_FILE).read_text())
    held_elsewhere(fresh)
    with pytest.raises(CheckpointError, match="being trained by another process"):  # not
        prepare(train_config(corpus), fresh, resume=True)  # "remove it and train again"
    holder.communicate("")  # that training ends: the run resumes here
    run = prepare(train_config(corpus, "train.max_steps=6"), tmp_path / "run", resume=True)
    # and while this process trains it (from setup to the end of training), others wait
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from minigpt_cli.run import layout; layout.hold_run_dir(Path(sys.argv[1]))",
             str(tmp_path / "run")]
    refused = subprocess.run(probe, capture_output=True, text=True)
    assert refused.returncode != 0 and "being trained by another process" in refused.stderr
    run.trainer.fit()
    assert subprocess.run(probe).returncode == 0  # released when training ended


def test_a_resume_that_fails_to_set_up_lets_go_of_the_run(corpus, tmp_path, train_config):
    from minigpt_cli.errors import CheckpointError

    run = prepare(train_config(corpus, "train.max_steps=2"), tmp_path / "run")
    (tmp_path / "fresh").mkdir()  # a run with no checkpoint: nothing to resume
    (tmp_path / "fresh" / layout.CONFIG_FILE).write_text(
        (tmp_path / "run" / layout.CONFIG_FILE).read_text())
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        prepare(train_config(corpus), tmp_path / "fresh", resume=True)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from minigpt_cli.run import layout; layout.hold_run_dir(Path(sys.argv[1]))",
         str(tmp_path / "fresh")], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr  # another process may train it now
    run.trainer.fit()

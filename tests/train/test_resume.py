"""Resuming is exact after a stop at any step or a metrics line torn by a crash; a loss
that diverges stops training before a broken model is saved."""

from __future__ import annotations

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

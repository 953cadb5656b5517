"""The training loop: schedule, falling loss, checkpoints, exact resume, stopping."""

import json
from pathlib import Path

import pytest

from minigpt_cli.config import Config, TrainConfig
from minigpt_cli.errors import CheckpointError, ConfigError
from minigpt_cli.run import load
from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingStopped, lr_at

TRAIN = ["train.batch_size=4", "train.log_interval=1", "train.eval_interval=10",
         "train.eval_iters=2", "train.checkpoint_interval=10", "train.warmup_steps=5",
         "train.learning_rate=3e-3", "train.device=cpu"]


@pytest.fixture
def corpus(write_corpus) -> Path:
    return write_corpus(lines=600)


@pytest.fixture(scope="session")
def trainer_config(toy_config):
    """``trainer_config(corpus, *extra)``: the tiny preset on ``corpus``, the two-layer toy
    with dropout 0.1, an evaluation and a checkpoint every 10 steps."""
    model = toy_config.overrides(dropout=0.1)

    def make(corpus: Path, *extra: str) -> Config:
        return Config.from_sources("tiny", overrides=[f"data.dataset={corpus}", *model, *TRAIN,
                                                      *extra])
    return make


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_saves(corpus, trainer_config, tmp_path):
    run = prepare(trainer_config(corpus, "train.max_steps=40"), tmp_path / "run")
    result = run.trainer.fit()
    assert result.step == 40
    losses = [m["loss"] for m in metrics(run.run_dir) if "loss" in m]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    vals = [m for m in metrics(run.run_dir) if "val_loss" in m]
    assert [m["step"] for m in vals] == [10, 20, 30, 40]
    assert all({"step", "loss", "lr", "tokens_per_sec"} <= set(m) for m in metrics(run.run_dir)
               if "loss" in m)
    loaded = load.load_run(run.run_dir)
    assert loaded.state["step"] in (10, 20, 30, 40)
    assert loaded.config.model.vocab_size == 257
    assert (run.run_dir / "config.yaml").is_file()


def test_existing_run_is_never_overwritten(corpus, trainer_config, tmp_path):
    run = prepare(trainer_config(corpus, "train.max_steps=2"), tmp_path / "run")
    run.trainer.fit()
    with pytest.raises(CheckpointError, match="already exists"):
        prepare(trainer_config(corpus, "train.max_steps=2"), tmp_path / "run")


def test_resume_matches_an_uninterrupted_run_exactly(corpus, trainer_config, tmp_path):
    full = prepare(trainer_config(corpus, "train.max_steps=30"), tmp_path / "full")
    full.trainer.fit()

    part = prepare(trainer_config(corpus, "train.max_steps=30"), tmp_path / "part")
    stop_at = 13

    def stop(event):
        if getattr(event, "step", 0) == stop_at and type(event).__name__ == "Logged":
            part.trainer.request_stop()

    part.trainer.callbacks.append(stop)
    with pytest.raises(TrainingStopped) as e:
        part.trainer.fit()
    assert e.value.step == stop_at

    resumed = prepare(trainer_config(corpus, "train.max_steps=30"), tmp_path / "part", resume=True)
    assert resumed.trainer.step == stop_at
    resumed.trainer.fit()
    strip = [{k: v for k, v in m.items() if k not in ("tokens_per_sec", "elapsed", "mfu")}
             for m in metrics(tmp_path / "full")]
    again = [{k: v for k, v in m.items() if k not in ("tokens_per_sec", "elapsed", "mfu")}
             for m in metrics(tmp_path / "part")]
    assert again == strip


def test_resume_with_a_higher_max_steps_continues(corpus, trainer_config, tmp_path):
    run = prepare(trainer_config(corpus, "train.max_steps=10"), tmp_path / "run")
    run.trainer.fit()
    with pytest.raises(ConfigError, match="already finished"):
        prepare(trainer_config(corpus), tmp_path / "run", resume=True)
    more = prepare(trainer_config(corpus, "train.max_steps=15"), tmp_path / "run", resume=True,
                   changed={"train.max_steps"})
    assert more.trainer.fit().step == 15


def test_resume_refuses_another_model_shape(corpus, trainer_config, tmp_path):
    run = prepare(trainer_config(corpus, "train.max_steps=4"), tmp_path / "run")
    run.trainer.fit()
    with pytest.raises(ConfigError, match="model.num_layers"):
        prepare(trainer_config(corpus, "model.num_layers=3"), tmp_path / "run", resume=True,
                changed={"model.num_layers"})


def test_resume_with_nothing_to_resume(corpus, trainer_config, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        prepare(trainer_config(corpus), tmp_path / "empty", resume=True)


def test_trains_with_a_tokenizer_from_outside_the_package(corpus, trainer_config, tmp_path,
                                                          external_tokenizer):
    run = prepare(trainer_config(corpus, "train.max_steps=3", "tokenizer.spec=reverse-byte"),
                  tmp_path / "run")
    run.trainer.fit()
    loaded = load.load_run(run.run_dir)
    assert isinstance(loaded.tokenizer, external_tokenizer)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"

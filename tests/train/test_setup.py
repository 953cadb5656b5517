"""Training setup: MFU in the training metrics, and torch.compile for the training model."""

import json
from pathlib import Path

import pytest

from minigpt_cli.config import Config


@pytest.fixture
def quick_config(toy_config):
    """``quick_config(corpus, *extra)``: the tiny preset cut to four steps of a one-layer toy
    with a context of 16, a log line every two steps."""
    def make(corpus: Path, *extra: str) -> Config:
        return Config.from_sources("tiny", overrides=[
            f"data.dataset={corpus}", *toy_config.overrides(max_seq_length=16, num_layers=1),
            "train.batch_size=2", "train.max_steps=4", "train.log_interval=2",
            "train.device=cpu", *extra])
    return make


def test_metrics_record_mfu(corpus, quick_config, tmp_path):
    from minigpt_cli.train.setup import prepare

    run = prepare(quick_config(corpus), tmp_path / "run")
    assert run.trainer.peak_flops > 0
    run.trainer.fit()
    logged = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()
              if "tokens_per_sec" in x]
    assert len(logged) == 2
    for record in logged:
        expected = record["tokens_per_sec"] * run.trainer.flops_per_token / run.trainer.peak_flops
        assert record["mfu"] == pytest.approx(expected, rel=1e-2, abs=1e-4)


def test_mfu_is_never_over_100_percent(corpus, quick_config, tmp_path):
    """A peak timed while the machine was busy is low: what training reaches raises it."""
    from minigpt_cli.train.setup import prepare

    trainer = prepare(quick_config(corpus), tmp_path / "run").trainer
    trainer.peak_flops = 1000 * trainer.flops_per_token  # 1,000 tokens/s
    assert trainer._mfu(500) == pytest.approx(0.5)
    assert trainer._mfu(4000) == 1.0  # over the timed peak: the new peak
    assert trainer.peak_flops == pytest.approx(4000 * trainer.flops_per_token)
    assert trainer._mfu(2000) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch._dynamo
def test_compile_wraps_the_training_model_only(corpus, quick_config, tmp_path):
    from minigpt_cli.train.setup import prepare

    run = prepare(quick_config(corpus, "train.compile=true"), tmp_path / "run")
    assert run.trainer.train_model is not run.trainer.model
    assert getattr(run.trainer.train_model, "_orig_mod", None) is run.trainer.model
    plain = prepare(quick_config(corpus), tmp_path / "plain")
    assert plain.trainer.train_model is plain.trainer.model


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_training_matches_eager(corpus, quick_config, tmp_path):
    from minigpt_cli.train.setup import prepare

    losses = []
    for name, extra in (("eager", ()), ("compiled", ("train.compile=true",))):
        run = prepare(quick_config(corpus, "train.precision=fp32", *extra), tmp_path / name)
        run.trainer.fit()
        losses.append([json.loads(x)["loss"] for x in
                       (run.run_dir / "metrics.jsonl").read_text().splitlines()
                       if "tokens_per_sec" in x])
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_epochs_given_as_an_override_set_the_length_of_a_new_run(corpus, toy_config, tmp_path):
    import math

    from minigpt_cli.train.setup import prepare

    cfg = Config.from_sources("tiny", overrides=[  # tiny's own max_steps is 1500
        f"data.dataset={corpus}", *toy_config.overrides(max_seq_length=16, num_layers=1),
        "train.batch_size=2", "train.device=cpu", "train.epochs=0.01"])
    run = prepare(cfg, tmp_path / "run")
    assert run.trainer.total_steps == math.ceil(0.01 * run.trainer.sampler.n_windows / 2)


def test_epochs_on_resume_replace_the_runs_max_steps(corpus, quick_config, tmp_path):
    import math

    from minigpt_cli.config import override_keys
    from minigpt_cli.train.setup import prepare

    prepare(quick_config(corpus), tmp_path / "run").trainer.fit()  # max_steps 4
    overrides = ["train.epochs=0.01"]
    run = prepare(Config.from_sources("tiny", overrides=overrides), tmp_path / "run",
                  resume=True, changed=override_keys(overrides))
    assert (run.config.train.max_steps, run.config.train.epochs) == (None, 0.01)
    assert run.trainer.step == 4
    assert run.trainer.total_steps == math.ceil(0.01 * run.trainer.sampler.n_windows / 2) > 4


def test_a_config_that_does_not_validate_writes_nothing(corpus, quick_config, tmp_path):
    from minigpt_cli.errors import ConfigError
    from minigpt_cli.train.setup import prepare

    cfg = quick_config(corpus)
    cfg.train.seed = -1  # set past from_sources' checks, as code calling prepare() may
    with pytest.raises(ConfigError, match="train.seed"):
        prepare(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()

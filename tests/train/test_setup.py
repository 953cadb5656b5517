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

"""MFU: FLOPs per token, device peaks, and MFU in the training metrics."""

import json
from pathlib import Path

import pytest
import torch

from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.device import Precision
from minigpt_cli.model import flops
from minigpt_cli.model.gpt import GPT

BF16, FP32 = Precision("bf16", torch.bfloat16), Precision("fp32", None)


def test_flops_per_token_counts_every_weight_once_and_the_attention():
    cfg = ModelConfig(vocab_size=50257, max_seq_length=128, embed_dim=256, num_heads=8,
                      num_layers=4, ff_dim=1024)
    model = GPT(cfg)
    C, L, F, V = 256, 4, 1024, 50257
    per_layer = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    weights = V * C + L * per_layer + 2 * C  # tied head once, final norm, no positions
    assert flops.flops_per_token(model) == 6 * weights + 12 * L * 128 * C


def test_gpu_peaks_come_from_the_data_sheet(monkeypatch):
    cuda = torch.device("cuda")
    for name, precision, expected in [("NVIDIA H100 80GB HBM3", BF16, 989e12),
                                      ("NVIDIA H100 PCIe", BF16, 756e12),
                                      ("NVIDIA A100-SXM4-40GB", FP32, 156e12),
                                      ("Tesla T4", FP32, None),
                                      ("Some Future GPU", BF16, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, n=name: n)
        assert flops.peak_flops(cuda, precision) == expected, name
    assert flops.peak_flops(torch.device("mps"), BF16) is None


def test_cpu_peak_is_measured():
    peak = flops.measure_matmul_flops(torch.device("cpu"), torch.float32, (64, 64, 64), 2)
    assert 1e6 < peak < 1e15
    assert flops.peak_flops(torch.device("cpu"), FP32) > 0


@pytest.fixture
def corpus(write_corpus) -> Path:
    return write_corpus(lines=400)


def toy_run(corpus: Path, *extra: str) -> Config:
    return Config.from_sources("tiny", overrides=[
        f"data.dataset={corpus}", "model.max_seq_length=16", "model.embed_dim=32",
        "model.num_heads=2", "model.num_layers=1", "model.ff_dim=64", "train.batch_size=2",
        "train.max_steps=4", "train.log_interval=2", "train.device=cpu", *extra])


def test_metrics_record_mfu(corpus, tmp_path):
    from minigpt_cli.train.setup import prepare

    run = prepare(toy_run(corpus), tmp_path / "run")
    assert run.trainer.peak_flops > 0
    run.trainer.fit()
    logged = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()
              if "tokens_per_sec" in x]
    assert len(logged) == 2
    for record in logged:
        expected = record["tokens_per_sec"] * run.trainer.flops_per_token / run.trainer.peak_flops
        assert record["mfu"] == pytest.approx(expected, rel=1e-2, abs=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch._dynamo
def test_compile_wraps_the_training_model_only(corpus, tmp_path):
    from minigpt_cli.train.setup import prepare

    run = prepare(toy_run(corpus, "train.compile=true"), tmp_path / "run")
    assert run.trainer.train_model is not run.trainer.model
    assert getattr(run.trainer.train_model, "_orig_mod", None) is run.trainer.model
    plain = prepare(toy_run(corpus), tmp_path / "plain")
    assert plain.trainer.train_model is plain.trainer.model


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_training_matches_eager(corpus, tmp_path):
    from minigpt_cli.train.setup import prepare

    losses = []
    for name, extra in (("eager", ()), ("compiled", ("train.compile=true",))):
        run = prepare(toy_run(corpus, "train.precision=fp32", *extra), tmp_path / name)
        run.trainer.fit()
        losses.append([json.loads(x)["loss"] for x in
                       (run.run_dir / "metrics.jsonl").read_text().splitlines()
                       if "tokens_per_sec" in x])
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)

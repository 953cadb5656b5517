"""Modern architecture variants through the whole pipeline: train, resume exactly, eval,
``inspect model`` and ``inspect attention``."""

from __future__ import annotations

import pytest

from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "llama-gqa-untied": ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
                         "model.bias=false", "model.num_heads=4", "model.num_kv_heads=2",
                         "model.tie_embeddings=false", "model.ff_dim=null"],
    "rope-qknorm-bf16": ["model.position=rope", "model.qk_norm=true", "train.precision=bf16"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_variant_trains_resumes_exactly_and_is_inspected(name, corpus, train_config, tmp_path,
                                                           stop_after, untimed_records, cli):
    settings = ["train.max_steps=8", *VARIANTS[name]]
    full = prepare(train_config(corpus, *settings), tmp_path / "full")
    full.trainer.fit()
    part = prepare(train_config(corpus, *settings), tmp_path / "part")
    stop_after(part, 5)
    with pytest.raises(TrainingStopped):
        part.trainer.fit()
    prepare(train_config(corpus, *settings), tmp_path / "part", resume=True).trainer.fit()
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")

    report = cli.ok_json("eval", "--model", tmp_path / "full", "--device", "cpu", "--json")
    assert 0 < report["loss"] < 6
    info = cli.ok_json("inspect", "model", "--model", tmp_path / "full", "--json")
    model_cfg = info["config"]["model"]
    assert model_cfg["position"] == "rope" and model_cfg["ff_dim"] is not None
    assert info["tied_head"] is (model_cfg["tie_embeddings"])
    text = cli.ok_text("inspect", "model", "--model", tmp_path / "full")
    assert "rope" in text
    weights = cli.ok_json("inspect", "attention", "--model", tmp_path / "full", "hello there",
                          "--layer", 0, "--json")
    assert weights["num_heads"] == model_cfg["num_heads"]

"""LoRA fine-tuning: the base stays bit-identical, checkpoints hold the adapters and the
base's path and sha256, resuming is exact, and a missing or changed base is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from minigpt_cli.errors import CheckpointError
from minigpt_cli.model import lora
from minigpt_cli.run import checkpoint, load
from minigpt_cli.train.setup import prepare
from minigpt_cli.train.trainer import TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base(tmp_path, corpus, toy_run):
    return toy_run(tmp_path / "base", corpus, seed=1)


@pytest.fixture
def lora_config(train_config, corpus, base):
    def make(*extra: str):
        return train_config(corpus, f"train.init={base}", "lora.rank=4", "lora.alpha=8",
                            "lora.dropout=0.1", *extra)
    return make


def test_lora_training_keeps_the_base_and_saves_only_adapters(tmp_path, base, lora_config):
    run = prepare(lora_config("train.max_steps=6"), tmp_path / "lora")
    trainable, total = lora.count_parameters(run.trainer.model)
    assert 0 < trainable < total / 5
    optimized = [p for g in run.trainer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in optimized) == trainable
    run.trainer.fit()

    base_weights = load.load_run(base).model.state_dict()
    trained = run.trainer.model.state_dict()
    for name, tensor in base_weights.items():
        assert torch.equal(trained[name], tensor), name

    for step in checkpoint.step_dirs(tmp_path / "lora"):
        saved = checkpoint.read_weights(step)
        assert saved and all(lora.is_adapter_key(k) for k in saved)
        record = checkpoint.read_state(step)["base"]
        assert record["path"] == str(base.resolve())
        assert record["sha256"] == lora.fingerprint(
            {k: v for k, v in base_weights.items() if k != "lm_head.weight"})

    loaded = load.load_run(tmp_path / "lora", which="latest")
    assert not lora.has_adapters(loaded.model)  # merged for inference
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    run.trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], run.trainer.model(ids)[0],
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(loaded.model(ids)[0], load.load_run(base).model(ids)[0],
                                  atol=1e-4)


def test_stopping_and_resuming_a_lora_run_is_exact(tmp_path, lora_config, untimed_records,
                                                   stop_after):
    prepare(lora_config("train.max_steps=9"), tmp_path / "full").trainer.fit()
    run = prepare(lora_config("train.max_steps=9"), tmp_path / "part")
    for steps in (3, 4):
        stop_after(run, steps)
        with pytest.raises(TrainingStopped):
            run.trainer.fit()
        run = prepare(lora_config("train.max_steps=9"), tmp_path / "part", resume=True)
    run.trainer.fit()
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")
    full = checkpoint.read_weights(checkpoint.checkpoint_dir(tmp_path / "full", "latest"))
    part = checkpoint.read_weights(checkpoint.checkpoint_dir(tmp_path / "part", "latest"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def test_a_missing_or_changed_base_is_refused_naming_its_path(tmp_path, base, lora_config,
                                                              corpus, toy_run):
    prepare(lora_config("train.max_steps=4"), tmp_path / "lora").trainer.fit()
    shutil.move(base, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError) as e:
        load.load_run(tmp_path / "lora")
    assert f"{base.resolve()}, is missing" in e.value.message
    with pytest.raises(CheckpointError, match="is missing"):
        prepare(lora_config("train.max_steps=8"), tmp_path / "lora", resume=True)

    toy_run(base, corpus, seed=2)  # another model in its place
    with pytest.raises(CheckpointError) as e:
        load.load_run(tmp_path / "lora")
    assert f"{base.resolve()}, changed: the sha256 of its weights is" in e.value.message

    shutil.rmtree(base)
    toy_run(base, corpus, seed=1, num_layers=1)  # another shape
    with pytest.raises(CheckpointError) as e:
        load.load_run(tmp_path / "lora")
    assert "changed: it has no transformer.h.1" in e.value.message

    shutil.rmtree(base)
    shutil.move(tmp_path / "elsewhere", base)  # back as it was
    assert load.load_run(tmp_path / "lora").config.lora.rank == 4


def test_lora_on_conversations_trains_the_templates_new_tokens_and_resumes(
        tmp_path, base, train_config, untimed_records, stop_after):
    """Fine-tuning a base on conversations adds the template's tokens: under LoRA their
    embedding rows train beside the adapters (the base's rows stay bit-identical), the
    checkpoint holds just those rows, loading grows the base the same way, and resuming
    is exact."""
    import json

    from minigpt_cli.chat.template import TEMPLATES

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w.upper()}]})
        + "\n" for w in ("abc", "bcd", "cde", "def", "efg", "fgh", "ghi", "hij") * 8))
    settings = (f"train.init={base}", "lora.rank=4", "lora.alpha=8", "train.max_steps=6")

    def config():
        return train_config(chats, *settings)

    run = prepare(config(), tmp_path / "lora")
    before = run.trainer.model.transformer.wte.weight.detach().clone()
    n_new = len(TEMPLATES["minigpt"].special_tokens)
    base_vocab = before.size(0) - n_new
    trainable, _ = lora.count_parameters(run.trainer.model)
    adapters = sum(p.numel() for n, p in run.trainer.model.named_parameters() if ".lora_" in n)
    assert trainable == adapters + n_new * before.size(1)
    run.trainer.fit()
    after = run.trainer.model.transformer.wte.weight.detach()
    assert torch.equal(after[:base_vocab], before[:base_vocab])
    assert not torch.equal(after[base_vocab:], before[base_vocab:])

    saved = checkpoint.read_weights(checkpoint.checkpoint_dir(tmp_path / "lora", "latest"))
    rows = saved["added_rows.transformer.wte.weight"]
    assert rows.shape == (n_new, before.size(1))
    assert all(lora.is_adapter_key(k) or k.startswith(lora.ADDED_ROWS) for k in saved)
    loaded = load.load_run(tmp_path / "lora", which="latest")
    ids = torch.randint(0, base_vocab, (1, 20), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = base_vocab + 1  # a template token
    run.trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], run.trainer.model(ids)[0],
                                   atol=1e-5, rtol=0)

    part = prepare(config(), tmp_path / "part")
    stop_after(part, 3)
    with pytest.raises(TrainingStopped):
        part.trainer.fit()
    prepare(config(), tmp_path / "part", resume=True).trainer.fit()
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "lora")

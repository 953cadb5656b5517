"""``minigpt train --init BASE --lora RANK`` and every command on the LoRA run it makes,
through the real Typer app; a missing or changed base is a one-line error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minigpt_cli.config import Config
from minigpt_cli.train.setup import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
                for i in range(300))
TRAIN = ["--max-steps", "4", "--device", "cpu", "--set", "train.batch_size=4",
         "--set", "train.eval_iters=1", "--set", "train.log_interval=2"]
USES_MODEL = {
    "generate": ["generate", "--prompt", "line", "--max-new-tokens", "5", "--seed", "1"],
    "eval": ["eval", "--json"],
    "chat": ["chat", "--max-new-tokens", "3"],
    "export": ["export", "--out", "exported"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_train_settings) -> Path:
    """A toy base run and a LoRA run trained on it with the command line."""
    from typer.testing import CliRunner

    from minigpt_cli.cli.app import app

    w = tmp_path_factory.mktemp("lora-cli")
    (w / "corpus.txt").write_text(LINES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(w / ".cache"))
        cfg = Config.from_sources("tiny", overrides=[f"data.dataset={w / 'corpus.txt'}",
                                                     *toy_train_settings, "train.max_steps=4"])
        prepare(cfg, w / "base").trainer.fit()
        result = CliRunner().invoke(app, ["train", "--init", str(w / "base"), "--lora", "4",
                                          "--dataset", str(w / "corpus.txt"), "--out",
                                          str(w / "lora"), *TRAIN])
    assert result.exit_code == 0, result.output
    (w / "train-output.txt").write_text(result.stdout)
    return w


@pytest.fixture
def here(world, monkeypatch) -> Path:
    monkeypatch.chdir(world)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(world / ".cache"))
    yield world
    shutil.rmtree(world / "exported", ignore_errors=True)


def test_the_panel_shows_trainable_and_total_parameters(world):
    out = (world / "train-output.txt").read_text()
    assert "trainable of" in out and "parameters (" in out, out


@pytest.mark.parametrize("command", USES_MODEL)
def test_every_command_works_on_a_lora_run(command, here, cli):
    args = USES_MODEL[command]
    out = cli.ok_text(args[0], "--model", "lora", *args[1:],
                      input="hello\n/quit\n" if command == "chat" else None)
    if command == "eval":
        assert json.loads(out)
    if command == "export":
        assert (here / "exported" / "model.safetensors").is_file()


def test_adapter_only_export_writes_a_peft_folder(here, cli):
    cli.ok_text("export", "--model", "lora", "--adapter-only", "--out", "exported")
    assert sorted(p.name for p in (here / "exported").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    result = cli.invoke("export", "--model", "base", "--adapter-only", "--out", "other")
    cli.assert_one_line_error(result, "--adapter-only:", "is not a LoRA run")
    result = cli.invoke("export", "--model", "lora", "--adapter-only", "--format", "gguf",
                        "--out", "other.gguf")
    cli.assert_one_line_error(result, "--adapter-only writes a PEFT adapter folder")
    assert not (here / "other").exists() and not (here / "other.gguf").exists()


def test_a_lora_target_that_matches_nothing_writes_nothing(here, cli):
    result = cli.invoke("train", "--init", "base", "--lora", "2", "--set",
                        "lora.targets=c_fc, wq", "--dataset", "corpus.txt", "--out", "nope")
    cli.assert_one_line_error(result, "lora.targets: 'wq' matches no module")
    assert not (here / "nope").exists()


@pytest.mark.parametrize("command", [*USES_MODEL, "resume"])
def test_a_missing_base_is_one_line_naming_it(command, here, cli):
    args = (["train", "--out", "lora", "--resume", "--max-steps", "6"] if command == "resume"
            else [USES_MODEL[command][0], "--model", "lora", *USES_MODEL[command][1:]])
    (here / "base").rename(here / "base-moved")
    try:
        result = cli.invoke(*args, input="")
    finally:
        (here / "base-moved").rename(here / "base")
    cli.assert_one_line_error(result, f"the base model of lora, {here / 'base'}, is missing")

"""``minigpt eval`` and ``minigpt inspect`` through the real Typer app, on a toy run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minigpt_cli.cli.app import app
from minigpt_cli.config import ModelConfig
from minigpt_cli.device import cpu_has_fast_bf16
from minigpt_cli.model.gpt import GPT

runner = CliRunner()

TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog; naïve café number {i * 7}.\n"
    for i in range(60)
)  # about 5 KB, so the default val split (10%) spans several 32-token windows


pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture
def corpus(write_corpus) -> Path:
    return write_corpus(TEXT)


@pytest.fixture
def run_dir(tmp_path, corpus, toy_run) -> Path:
    return toy_run(tmp_path / "run", corpus)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("Error:") and "\n" not in message, message
    for needle in needles:
        assert needle in message


def assert_consistent(r: dict) -> None:
    total = r["loss"] * r["tokens"]
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(total / (math.log(2) * r["bytes"]))
    assert r["word_perplexity"] == pytest.approx(math.exp(total / r["words"]))


# ---- eval --------------------------------------------------------------------------------------

def test_eval_json_defaults_to_the_runs_own_validation_split(run_dir, corpus):
    r = ok_json("eval", "--model", run_dir, "--json")
    assert r["dataset"] == str(corpus) and r["split"] == "val"
    assert r["step"] == 12 and r["context"] == 32 and r["tokenizer"] == "byte"
    assert 0 < r["bytes"] < len(TEXT.encode()) / 5  # the last tenth or so of the file
    assert r["tokens"] == r["bytes"] - 1  # byte tokens; the first has no history
    assert_consistent(r)
    assert 4.5 < r["loss"] < 6.5  # an untrained model is near uniform: ln(257) = 5.55
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved[f"{corpus}:val"]["loss"] == pytest.approx(r["loss"])


def test_two_models_give_a_json_list_and_a_side_by_side_table(tmp_path, corpus, toy_run):
    a = toy_run(tmp_path / "a", corpus, seed=1)
    b = toy_run(tmp_path / "b", corpus, seed=2)
    rows = ok_json("eval", "--model", a, "--model", b, "--split", "train", "--json")
    assert [Path(r["model"]).name for r in rows] == ["a", "b"]
    assert rows[0]["loss"] != rows[1]["loss"] and rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        assert r["split"] == "train"
        assert_consistent(r)
    result = invoke("eval", "--model", a, "--model", b)
    assert result.exit_code == 0, result.output
    for label in ("a · step 12", "b · step 12", "perplexity", "bits per byte",
                  "word perplexity"):
        assert label in result.stdout


def test_eval_text_file_scores_the_whole_file(run_dir, tmp_path):
    text = "Ünïcode words, [bold]not markup[/bold]\nand a second line\n" * 20
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    r = ok_json("eval", "--model", run_dir, "--text-file", path, "--stride", 16, "--json")
    assert r["bytes"] == len(text.encode()) and r["words"] == len(text.split())
    assert r["tokens"] == r["bytes"] - 1 and r["stride"] == 16 and r["split"] is None
    assert_consistent(r)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert any(key.startswith("file:") and key.endswith("@stride=16") for key in saved)
    table = invoke("eval", "--model", run_dir, "--text-file", path)
    assert table.exit_code == 0 and str(path.name) in table.stdout


def test_eval_text_shorter_than_one_window(run_dir, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hi there", encoding="utf-8")
    r = ok_json("eval", "--model", run_dir, "--text-file", path, "--json")
    assert r["tokens"] == 7 and r["bytes"] == 8 and r["words"] == 2


def test_eval_errors_are_one_line(run_dir, tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(invoke("eval", "--model", run_dir, "--text-file", empty), "empty")
    assert_one_line_error(invoke("eval", "--model", tmp_path / "missing"), "does not exist")
    assert_one_line_error(invoke("eval", "--model", run_dir, "--split", "test"), "test")
    assert_one_line_error(invoke("eval", "--model", run_dir, "--stride", 33), "stride")
    assert_one_line_error(invoke("eval", "--model", run_dir, "--dataset", corpus,
                                 "--text-file", corpus), "either")


# ---- inspect -----------------------------------------------------------------------------------

def test_inspect_model(run_dir):
    info = ok_json("inspect", "model", "--model", run_dir, "--json")
    model = GPT(ModelConfig(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=2,
                            num_layers=2, ff_dim=64, dropout=0.0))
    params = info["parameters"]
    assert params["total"] == model.num_params()
    assert sum(params[k] for k in ("embeddings", "attention", "mlp", "norms")) == params["total"]
    assert info["tied_head"] is True
    assert info["step"] == 12 and info["best_val_loss"] == 5.25
    assert info["tokenizer"] == {"spec": "byte", "vocab_size": 257, "eot_id": 256}
    assert info["checkpoint_bytes"]["weights"] > 4 * params["total"] * 0.99
    assert info["config"]["model"]["embed_dim"] == 32
    result = invoke("inspect", "model", "--model", run_dir)
    assert result.exit_code == 0, result.output
    assert f"{params['total']:,}" in result.stdout and "tied" in result.stdout
    assert_one_line_error(invoke("inspect", "model", "--model", run_dir / "nope"))


def test_inspect_tokenizer(run_dir):
    text = "héllo [red]x[/red]\n"
    info = ok_json("inspect", "tokenizer", "byte", text, "--json")
    assert info["ids"] == list(text.encode()) and info["vocab_size"] == 257
    assert "".join(info["tokens"]) == text and len(info["tokens"]) == len(info["ids"])
    assert info["bytes_per_token"] == pytest.approx(1.0)
    assert ok_json("inspect", "tokenizer", run_dir, text, "--json")["ids"] == info["ids"]
    result = invoke("inspect", "tokenizer", run_dir, text)
    assert result.exit_code == 0, result.output
    assert "[red]x[/red]" in result.stdout  # shown literally, never as markup
    assert "vocabulary 257" in result.stdout


def test_inspect_tokenizer_errors(tmp_path):
    assert_one_line_error(invoke("inspect", "tokenizer", "char", "abc"), "run directory")
    assert_one_line_error(invoke("inspect", "tokenizer", "no-such-tokenizer"), "unknown")
    assert_one_line_error(invoke("inspect", "tokenizer", tmp_path), "not a run directory")


def test_inspect_presets():
    rows = ok_json("inspect", "presets", "--json")
    names = [r["name"] for r in rows]
    assert "tiny" in names and all(r["description"] for r in rows)
    result = invoke("inspect", "presets")
    assert result.exit_code == 0 and "tiny" in result.stdout


def test_inspect_env():
    info = ok_json("inspect", "env", "--device", "cpu", "--json")
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"  # what auto picks on this CPU
    assert info["device"] == "cpu" and info["precision"] == expected
    assert info["versions"]["torch"] == torch.__version__
    assert info["self_test"]["passed"] is True, info["self_test"]
    assert "byte" in info["tokenizers"]
    result = invoke("inspect", "env", "--device", "cpu")
    assert result.exit_code == 0 and "passed" in result.stdout


def test_help_has_examples():
    for args in (["eval", "--help"], ["inspect", "tokenizer", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Examples" in result.stdout

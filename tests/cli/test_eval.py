"""``minigpt eval`` through the real Typer app, on a toy run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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


def assert_consistent(r: dict) -> None:
    total = r["loss"] * r["tokens"]
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(total / (math.log(2) * r["bytes"]))
    assert r["word_perplexity"] == pytest.approx(math.exp(total / r["words"]))


def test_eval_json_defaults_to_the_runs_own_validation_split(run_dir, corpus, cli):
    r = cli.ok_json("eval", "--model", run_dir, "--json")
    assert r["dataset"] == str(corpus) and r["split"] == "val"
    assert r["step"] == 12 and r["context"] == 32 and r["tokenizer"] == "byte"
    assert 0 < r["bytes"] < len(TEXT.encode()) / 5  # the last tenth or so of the file
    assert r["tokens"] == r["bytes"] - 1  # byte tokens; the first has no history
    assert_consistent(r)
    assert 4.5 < r["loss"] < 6.5  # an untrained model is near uniform: ln(257) = 5.55
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved[f"{corpus}:val"]["loss"] == pytest.approx(r["loss"])


def test_two_models_give_a_json_list_and_a_side_by_side_table(tmp_path, corpus, toy_run, cli):
    a = toy_run(tmp_path / "a", corpus, seed=1)
    b = toy_run(tmp_path / "b", corpus, seed=2)
    rows = cli.ok_json("eval", "--model", a, "--model", b, "--split", "train", "--json")
    assert [Path(r["model"]).name for r in rows] == ["a", "b"]
    assert rows[0]["loss"] != rows[1]["loss"] and rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        assert r["split"] == "train"
        assert_consistent(r)
    result = cli.invoke("eval", "--model", a, "--model", b)
    assert result.exit_code == 0, result.output
    for label in ("a · step 12", "b · step 12", "perplexity", "bits per byte",
                  "word perplexity"):
        assert label in result.stdout


def test_eval_text_file_scores_the_whole_file(run_dir, tmp_path, cli):
    text = "Ünïcode words, [bold]not markup[/bold]\nand a second line\n" * 20
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    r = cli.ok_json("eval", "--model", run_dir, "--text-file", path, "--stride", 16, "--json")
    assert r["bytes"] == len(text.encode()) and r["words"] == len(text.split())
    assert r["tokens"] == r["bytes"] - 1 and r["stride"] == 16 and r["split"] is None
    assert_consistent(r)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert any(key.startswith("file:") and key.endswith("@stride=16") for key in saved)
    table = cli.invoke("eval", "--model", run_dir, "--text-file", path)
    assert table.exit_code == 0 and str(path.name) in table.stdout


def test_eval_text_shorter_than_one_window(run_dir, tmp_path, cli):
    path = tmp_path / "short.txt"
    path.write_text("hi there", encoding="utf-8")
    r = cli.ok_json("eval", "--model", run_dir, "--text-file", path, "--json")
    assert r["tokens"] == 7 and r["bytes"] == 8 and r["words"] == 2


def test_eval_errors_are_one_line(run_dir, tmp_path, corpus, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cli.assert_one_line_error(cli.invoke("eval", "--model", run_dir, "--text-file", empty), "empty")
    cli.assert_one_line_error(cli.invoke("eval", "--model", tmp_path / "missing"), "does not exist")
    cli.assert_one_line_error(cli.invoke("eval", "--model", run_dir, "--split", "test"), "test")
    cli.assert_one_line_error(cli.invoke("eval", "--model", run_dir, "--stride", 33), "stride")
    cli.assert_one_line_error(cli.invoke("eval", "--model", run_dir, "--dataset", corpus,
                                         "--text-file", corpus), "either")


def test_help_has_examples(cli):
    for args in (["eval", "--help"], ["inspect", "tokenizer", "--help"]):
        result = cli.invoke(*args)
        assert result.exit_code == 0 and "Examples" in result.stdout


def test_eval_quantized_reports_the_change_in_bits_per_byte(run_dir, cli):
    plain = cli.ok_json("eval", "--model", run_dir, "--precision", "fp32", "--json")
    r = cli.ok_json("eval", "--model", run_dir, "--quantize", "int8", "--json")
    assert r["quantize"] == "int8" and r["precision"] == "fp32"
    assert r["unquantized"]["bits_per_byte"] == pytest.approx(plain["bits_per_byte"])
    change = (r["bits_per_byte"] - plain["bits_per_byte"]) / plain["bits_per_byte"]
    assert r["bits_per_byte_change"] == pytest.approx(change)
    assert 0 < abs(change) < 0.01
    assert_consistent(r)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert {e["quantize"] for e in saved.values()} == {None, "int8"}  # side by side
    table = cli.invoke("eval", "--model", run_dir, "--quantize", "int4")
    assert table.exit_code == 0, table.output
    assert "bits per byte change" in table.stdout and "%" in table.stdout
    bad = cli.invoke("eval", "--model", run_dir, "--quantize", "q4")
    assert bad.exit_code == 1 and "--quantize" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

"""``minigpt inspect`` (model, tokenizer, attention, run, data, presets, env) through the
real Typer app, on a toy run."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt_cli.cli.figures import DPI, RUN_FIGSIZE, attention_figsize
from minigpt_cli.device import cpu_has_fast_bf16
from minigpt_cli.run import layout

PARAGRAPHS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "All:\nResolved. resolved.",
    "Second Citizen:\nOne word, good citizens: naïve café — ünïcode too.",
]
TEXT = "\n\n".join(PARAGRAPHS * 12) + "\n"  # about 3 KB; blank lines separate documents
METRICS = [
    *({"step": s, "loss": 5.5 - 0.04 * s, "lr": 1e-3 * min(1.0, s / 20), "tokens_per_sec":
       1000.0 + s, "epoch": s / 100, "elapsed": s / 10} for s in range(10, 101, 10)),
    {"step": 50, "val_loss": 4.0}, {"step": 100, "val_loss": 3.5},
]


pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture
def corpus(write_corpus) -> Path:
    return write_corpus(TEXT)


@pytest.fixture
def run_dir(tmp_path, corpus, toy_run) -> Path:
    """A toy run (byte tokenizer, 2 layers of 2 heads) with a metrics log, as train leaves it."""
    run = toy_run(tmp_path / "run", corpus, step=100, best_val_loss=3.5)
    lines = [json.dumps(m) for m in METRICS]
    (run / layout.METRICS_FILE).write_text("\n".join(lines) + "\n")
    return run


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking that it decodes."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()  # decodes every pixel
        assert image.size == struct.unpack(">II", data[16:24])
        return image.size


def test_inspect_model(tmp_path, corpus, toy_run, toy_gpt, cli):
    run_dir = toy_run(tmp_path / "run", corpus)  # step 12, best loss 5.25
    info = cli.ok_json("inspect", "model", "--model", run_dir, "--json")
    model = toy_gpt()
    params = info["parameters"]
    assert params["total"] == model.num_params()
    assert sum(params[k] for k in ("embeddings", "attention", "mlp", "norms")) == params["total"]
    assert info["tied_head"] is True
    assert info["step"] == 12 and info["best_val_loss"] == 5.25
    assert info["tokenizer"] == {"spec": "byte", "vocab_size": 257, "eot_id": 256}
    assert info["checkpoint_bytes"]["weights"] > 4 * params["total"] * 0.99
    assert info["config"]["model"]["embed_dim"] == 32
    result = cli.invoke("inspect", "model", "--model", run_dir)
    assert result.exit_code == 0, result.output
    assert f"{params['total']:,}" in result.stdout and "tied" in result.stdout
    cli.assert_one_line_error(cli.invoke("inspect", "model", "--model", run_dir / "nope"))


@pytest.mark.parametrize("kv_heads, kind", [(1, "(multi-query)"), (2, "(grouped-query)"),
                                             (4, None)])
def test_inspect_model_names_the_kind_of_attention_heads(tmp_path, corpus, toy_run, cli,
                                                         kv_heads, kind):
    run_dir = toy_run(tmp_path / "run", corpus, num_heads=4, num_kv_heads=kv_heads)
    out = cli.ok_text("inspect", "model", "--model", run_dir)
    line = next(ln for ln in out.splitlines() if "kv heads" in ln)
    assert line.split()[2] == str(kv_heads)
    assert (kind in line) if kind else "query" not in line


def test_inspect_model_shows_the_length_that_rules_and_the_epochs_trained(tmp_path, corpus,
                                                                          toy_run, cli):
    from minigpt_cli.config import Config
    from minigpt_cli.run import checkpoint

    run_dir = toy_run(tmp_path / "run", corpus)
    cfg = Config.from_file(run_dir / layout.CONFIG_FILE)
    cfg.train.max_steps, cfg.train.epochs = 1500, 1.0  # as the tiny preset leaves them
    (run_dir / layout.CONFIG_FILE).write_text(cfg.to_yaml())
    state = checkpoint.checkpoint_dir(run_dir) / checkpoint.STATE_FILE
    saved = json.loads(state.read_text())
    saved["sampler"] = {"consumed": 2750, "n_windows": 1500}
    state.write_text(json.dumps(saved))

    assert cli.ok_json("inspect", "model", "--model", run_dir, "--json")["epochs"] == 1.8333
    out = cli.ok_text("inspect", "model", "--model", run_dir)
    assert "1,500 steps (train.max_steps)" in out and "12 steps, 1.83 epochs" in out
    assert "steps / epochs" not in out  # it showed 1500 / 1: epochs that max_steps overruled


def test_inspect_tokenizer(run_dir, cli):
    text = "héllo [red]x[/red]\n"
    info = cli.ok_json("inspect", "tokenizer", "byte", text, "--json")
    assert info["ids"] == list(text.encode()) and info["vocab_size"] == 257
    assert "".join(info["tokens"]) == text and len(info["tokens"]) == len(info["ids"])
    assert info["bytes_per_token"] == pytest.approx(1.0)
    assert cli.ok_json("inspect", "tokenizer", run_dir, text, "--json")["ids"] == info["ids"]
    result = cli.invoke("inspect", "tokenizer", run_dir, text)
    assert result.exit_code == 0, result.output
    assert "[red]x[/red]" in result.stdout  # shown literally, never as markup
    assert "vocabulary 257" in result.stdout


def test_inspect_tokenizer_errors(tmp_path, cli):
    cli.assert_one_line_error(cli.invoke("inspect", "tokenizer", "char", "abc"), "run directory")
    cli.assert_one_line_error(cli.invoke("inspect", "tokenizer", "no-such-tokenizer"), "unknown")
    cli.assert_one_line_error(cli.invoke("inspect", "tokenizer", tmp_path), "not a run directory")
    cli.assert_one_line_error(cli.invoke("inspect", "tokenizer", "", "x"), "empty tokenizer spec")


def test_inspect_tokenizer_pieces_keep_a_replacement_character_with_its_token(corpus, cli):
    text = "a\ufffdk é ✓p"  # a U+FFFD of the text; ✓ is unknown to the char vocabulary
    info = cli.ok_json("inspect", "tokenizer", "byte", text, "--json")
    assert info["tokens"] == ["a", "", "", "\ufffd", "k", " ", "", "é", " ", "", "", "✓", "p"]
    char = cli.ok_json("inspect", "tokenizer", "char", text, "--dataset", corpus, "--json")
    assert char["tokens"] == ["a", "\ufffd", "k", " ", "é", " ", "\ufffd", "p"]


def test_inspect_tokenizer_and_attention_read_stdin_as_utf8(run_dir, cli):
    result = cli.invoke("inspect", "tokenizer", "byte", "-", "--json", input="héllo".encode())
    assert result.exit_code == 0 and json.loads(result.stdout)["ids"] == list("héllo".encode())
    for args in (("tokenizer", "byte", "-"), ("attention", "--model", run_dir, "-")):
        result = cli.invoke("inspect", *args, input=b"ab\xffcd")
        cli.assert_one_line_error(result, "stdin is not UTF-8", "offset 2")


def test_inspect_tokenizer_on_a_dataset(corpus, cli):
    info = cli.ok_json("inspect", "tokenizer", "byte", "--dataset", corpus, "--json")
    d = info["dataset"]
    assert d["split"] == "train" and d["tokens"] == d["bytes"] and d["bytes_per_token"] == 1.0
    assert TEXT.startswith(info["text"]) and info["text"].endswith("\n")  # its first lines
    val = cli.ok_json("inspect", "tokenizer", "byte", "x", "--dataset", corpus, "--split", "val",
                      "--json")["dataset"]
    assert val["bytes"] + d["bytes"] == len(TEXT.encode())
    char = cli.ok_json("inspect", "tokenizer", "char", "Speak", "--dataset", corpus, "--json")
    assert char["num_tokens"] == 5 and char["dataset"]["tokens"] == len(
        TEXT.encode()[:d["bytes"]].decode())
    out = cli.ok_text("inspect", "tokenizer", "byte", "hi", "--dataset", corpus)
    assert "1.00 bytes per token" in out and "(train)" in out
    cli.assert_one_line_error(cli.invoke("inspect", "tokenizer", "byte", "--dataset", corpus,
                                         "--split", "test"), "test")


def test_inspect_presets(cli):
    rows = cli.ok_json("inspect", "presets", "--json")
    names = [r["name"] for r in rows]
    assert "tiny" in names and all(r["description"] for r in rows)
    result = cli.invoke("inspect", "presets")
    assert result.exit_code == 0 and "tiny" in result.stdout


def test_inspect_presets_shows_the_model_a_preset_starts_from(cli):
    rows = {r["name"]: r for r in cli.ok_json("inspect", "presets", "--json")}
    tiny, finetune = rows["tiny"], rows["gpt2-finetune"]
    assert (tiny["init"], tiny["layers"], tiny["embed_dim"]) == (None, 4, 128)
    # GPT-2 124M comes from train.init: not the default model's 4 layers x 256 and bytes
    assert finetune["init"] == "hf:openai-community/gpt2"
    assert finetune["layers"] is finetune["embed_dim"] is finetune["tokenizer"] is None
    assert "tinyshakespeare without it" in finetune["description"]  # the data, as README says
    out = cli.ok_text("inspect", "presets")
    block = out[out.index("gpt2-finetune"):out.index("llama-small")]
    assert "the model and tokenizer of hf:openai-community/gpt2" in block
    assert "layers ×" not in block


def test_inspect_env(cli):
    info = cli.ok_json("inspect", "env", "--device", "cpu", "--json")
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"  # what auto picks on this CPU
    assert info["device"] == "cpu" and info["precision"] == expected
    assert info["versions"]["torch"] == torch.__version__
    assert info["self_test"]["passed"] is True, info["self_test"]
    assert "byte" in info["tokenizers"]
    result = cli.invoke("inspect", "env", "--device", "cpu")
    assert result.exit_code == 0 and "passed" in result.stdout


def test_inspect_attention_json_is_a_causal_distribution_per_token(run_dir, cli):
    text = "To be, or not"
    info = cli.ok_json("inspect", "attention", "--model", run_dir, text, "--layer", 1, "--json")
    n = len(text.encode())
    assert info["ids"] == list(text.encode()) and "".join(info["tokens"]) == text
    assert info["layer"] == 1 and info["head"] is None and info["num_heads"] == 2
    assert info["step"] == 100
    w = np.array(info["weights"])
    assert w.shape == (n, n)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(np.triu(w, 1) == 0) and w[0, 0] == pytest.approx(1.0)
    per_head = [np.array(cli.ok_json("inspect", "attention", "--model", run_dir, text, "--layer", 1,
                                     "--head", h, "--json")["weights"]) for h in range(2)]
    np.testing.assert_allclose((per_head[0] + per_head[1]) / 2, w, atol=1e-6)


def test_inspect_attention_heat_map_in_the_terminal(run_dir, cli):
    out = cli.ok_text("inspect", "attention", "--model", run_dir, "ab c\n", "--head", 0)
    assert "layer 0 of 2 · head 0" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+ ", line)]
    assert len(rows) == 5  # one row per token
    assert "␣" in out and "↵" in out  # whitespace tokens are visible
    assert "█" in rows[0]  # the first token attends only to itself: weight 1
    mean = cli.ok_text("inspect", "attention", "--model", run_dir, "-", input="hello")
    assert "mean of 2 heads" in mean


def test_inspect_attention_png(run_dir, tmp_path, cli):
    pytest.importorskip("matplotlib")
    png = tmp_path / "attention.png"
    result = cli.invoke("inspect", "attention", "--model", run_dir, "To be, or not", "--png", png,
                        "--json")
    assert result.exit_code == 0, result.output
    n = len(json.loads(result.stdout)["ids"])
    w, h = attention_figsize(n)
    assert png_size(png) == (round(w * DPI), round(h * DPI))
    assert str(png) in result.stderr


def test_inspect_attention_errors(run_dir, tmp_path, cli):
    base = ("inspect", "attention", "--model", run_dir, "hello")
    cli.assert_one_line_error(cli.invoke(*base, "--layer", 2), "--layer 2", "0 to 1")
    cli.assert_one_line_error(cli.invoke(*base, "--head", 5), "--head 5", "0 to 1")
    cli.assert_one_line_error(cli.invoke(*base, "--layer", -1), "--layer -1")
    cli.assert_one_line_error(cli.invoke("inspect", "attention", "--model", run_dir, ""),
                              "no tokens")
    cli.assert_one_line_error(cli.invoke("inspect", "attention", "--model", tmp_path / "nope",
                                         "hi"), "does not exist")
    cli.assert_one_line_error(cli.invoke(*base, "--png", tmp_path / "no-such-dir" / "a.png"),
                              "cannot write")


def test_long_text_is_cut_to_the_context(run_dir, cli):
    result = cli.invoke("inspect", "attention", "--model", run_dir, "x" * 40, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["ids"]) == 32 and "first 32" in result.stderr


def test_inspect_run_json_series_and_summary_agree(run_dir, cli):
    info = cli.ok_json("inspect", "run", run_dir, "--json")
    train, val, s = info["train"], info["val"], info["summary"]
    assert train["step"] == list(range(10, 101, 10)) and val["step"] == [50, 100]
    assert train["loss"] == [m["loss"] for m in METRICS[:10]]
    assert len(train["lr"]) == len(train["tokens_per_sec"]) == len(train["step"])
    assert s["final_loss"] == train["loss"][-1] and s["min_loss"] == min(train["loss"])
    assert s["best_val_loss"] == min(val["val_loss"]) == 3.5 and s["best_val_step"] == 100
    assert s["peak_lr"] == max(train["lr"]) and s["final_lr"] == train["lr"][-1]
    assert s["mean_tokens_per_sec"] == pytest.approx(np.mean(train["tokens_per_sec"]))
    assert s["last_step"] == 100 and s["logged_steps"] == 10 and info["skipped_lines"] == 0


def test_inspect_run_charts_in_the_terminal(run_dir, cli):
    out = cli.ok_text("inspect", "run", run_dir)
    for label in ("training loss", "validation loss", "best 3.5000 at step 100", "learning rate",
                  "tokens/s", "step"):
        assert label in out
    braille = [line for line in out.splitlines() if any("⠁" <= c <= "⣿" for c in line)]
    assert len(braille) >= 10
    assert all(len(line) <= 100 for line in out.splitlines())


def test_inspect_run_png(run_dir, tmp_path, cli):
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    result = cli.invoke("inspect", "run", run_dir, "--png", png)
    assert result.exit_code == 0, result.output
    assert png_size(png) == (round(RUN_FIGSIZE[0] * DPI), round(RUN_FIGSIZE[1] * DPI))


def test_inspect_run_png_draws_a_single_logged_step(run_dir, tmp_path, monkeypatch, cli):
    from matplotlib.axes import Axes

    lines = (run_dir / layout.METRICS_FILE).read_text().splitlines()
    (run_dir / layout.METRICS_FILE).write_text(lines[0] + "\n")  # one training record
    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **k: drawn.append(k) or plot(ax, *a, **k))
    cli.ok_text("inspect", "run", run_dir, "--png", tmp_path / "one.png")
    assert len(drawn) == 3 and all(k.get("marker") for k in drawn)  # loss, lr, tokens/s


def test_inspect_run_skips_a_half_written_line(run_dir, cli):
    with (run_dir / layout.METRICS_FILE).open("a") as f:
        f.write('{"step": 110, "loss": 1.2, "lr"')
    result = cli.invoke("inspect", "run", run_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_lines"] == 1 and "skipped 1" in result.stderr


def test_inspect_run_errors(run_dir, tmp_path, cli):
    cli.assert_one_line_error(cli.invoke("inspect", "run", tmp_path / "nope"), "does not exist")
    for height in ("0", "-3", "2"):
        cli.assert_one_line_error(cli.invoke("inspect", "run", run_dir, "--height", height),
                                  f"--height must be at least 3, got {height}")
    cli.ok_text("inspect", "run", run_dir, "--height", "3")
    (run_dir / layout.METRICS_FILE).unlink()
    cli.assert_one_line_error(cli.invoke("inspect", "run", run_dir), "no metrics.jsonl")
    (run_dir / layout.METRICS_FILE).write_text("")
    cli.assert_one_line_error(cli.invoke("inspect", "run", run_dir), "no training records")
    cli.assert_one_line_error(cli.invoke("inspect", "run", tmp_path), "not a minigpt run")


def test_png_without_matplotlib_is_a_one_line_error(run_dir, tmp_path, monkeypatch, cli):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    for args in (("inspect", "run", run_dir), ("inspect", "attention", "--model", run_dir, "hi")):
        result = cli.invoke(*args, "--png", tmp_path / "x.png")
        cli.assert_one_line_error(result, "matplotlib", "pip install 'minigpt[plot]'")
        assert not (tmp_path / "x.png").exists()


def _split_texts(info: dict) -> dict[str, str]:
    """The file's text cut where the split sizes say (train first, then val)."""
    raw = TEXT.encode()
    cut = info["splits"]["train"]["bytes"]
    return {"train": raw[:cut].decode(), "val": raw[cut:].decode()}


def test_inspect_data_json_numbers_are_consistent(corpus, cli):
    info = cli.ok_json("inspect", "data", corpus, "--top", 5, "--json")
    assert info["tokenizer"] == "byte" and info["unit"] == "document"
    splits = info["splits"]
    assert list(splits) == ["train", "val"]
    assert sum(s["bytes"] for s in splits.values()) == len(TEXT.encode())
    for name, text in _split_texts(info).items():
        s = splits[name]
        docs = [d for d in text.split("\n\n") if d.strip()]
        assert s["tokens"] == s["bytes"] == len(text.encode()) and s["bytes_per_token"] == 1.0
        assert s["lines"] == text.count("\n") and s["words"] == len(text.split())
        assert s["documents"] == len(docs)
        lengths = s["lengths"]
        assert lengths["count"] == lengths["measured"] == len(docs) and not lengths["sampled"]
        assert sum(b["count"] for b in lengths["histogram"]) == len(docs)
        assert lengths["max"] == max(len(d.encode()) for d in docs)
        for b in lengths["histogram"]:
            assert b["count"] == sum(b["lo"] <= len(d.encode()) <= b["hi"] for d in docs)
        top = s["top_tokens"]
        assert len(top) == 5 and [t["count"] for t in top] == sorted(
            (t["count"] for t in top), reverse=True)
        for t in top:
            assert t["count"] == text.encode().count(bytes([t["id"]]))
            assert t["share"] == pytest.approx(t["count"] / s["tokens"])
            assert t["token"] == bytes([t["id"]]).decode()


def test_inspect_data_lines_and_a_learned_tokenizer(corpus, cli):
    info = cli.ok_json("inspect", "data", corpus, "--unit", "line", "--tokenizer", "char", "--json")
    assert info["tokenizer"].startswith("char") and info["unit"] == "line"
    for name, text in _split_texts(info).items():
        s = splits = info["splits"][name]
        lines = [x for x in text.split("\n") if x.strip()]
        assert s["lengths"]["count"] == len(lines)
        assert s["lengths"]["measured_tokens"] == sum(len(x) for x in lines)  # a token a char
        assert s["tokens"] == len(text) and splits["documents"] > 0


def test_inspect_data_in_the_terminal_and_from_a_run(run_dir, corpus, cli):
    out = cli.ok_text("inspect", "data", corpus)
    for label in ("byte (vocabulary 257)", "bytes per token", "documents", "Tokens per document",
                  "Most frequent tokens", "train", "val", "␣"):
        assert label in out
    assert "█" in out
    from_run = cli.ok_text("inspect", "data", "--model", run_dir)  # the run's dataset and tokenizer
    assert str(corpus) in from_run and "longer than the run's context of 32 tokens" in from_run


def test_inspect_data_errors(run_dir, corpus, tmp_path, cli):
    cli.assert_one_line_error(cli.invoke("inspect", "data", tmp_path / "missing.txt"), "not found")
    cli.assert_one_line_error(cli.invoke("inspect", "data", "no-such-dataset"), "unknown dataset")
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--unit", "word"), "--unit")
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--model", run_dir,
                                         "--tokenizer", "byte"), "either")
    cli.assert_one_line_error(cli.invoke("inspect", "data"), "no dataset")
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--tokenizer", "nope"),
                              "unknown")
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--tokenizer", ""),
                              "empty tokenizer spec")  # not the default, byte
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--context", "0"),
                              "--context")
    cli.assert_one_line_error(cli.invoke("inspect", "data", corpus, "--val-fraction", "1"),
                              "--val-fraction must be in (0, 1)")

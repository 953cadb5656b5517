"""``minigpt inspect data | run | attention`` and their core modules, on a toy run."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import minigpt_tokenizers
from minigpt_cli.cli import charts
from minigpt_cli.cli.app import app
from minigpt_cli.cli.figures import DPI, RUN_FIGSIZE, attention_figsize
from minigpt_cli.config import ModelConfig
from minigpt_cli.data import stats as datastats
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.evaluate.attention import attention_map
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import layout

runner = CliRunner()

PARAGRAPHS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "All:\nResolved. resolved.",
    "Second Citizen:\nOne word, good citizens: naïve café — ünïcode too.",
]
TEXT = "\n\n".join(PARAGRAPHS * 12) + "\n"  # about 3 KB; blank lines separate documents
TOY = dict(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=2, num_layers=2,
           ff_dim=64, dropout=0.0)
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
    run = toy_run(tmp_path / "run", corpus, step=100, best_val_loss=3.5, **TOY)
    lines = [json.dumps(m) for m in METRICS]
    (run / layout.METRICS_FILE).write_text("\n".join(lines) + "\n")
    return run


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ok_text(*args, input_text: str | None = None) -> str:
    result = runner.invoke(app, [str(a) for a in args], input=input_text)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("Error:") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking that it decodes."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()  # decodes every pixel
        assert image.size == struct.unpack(">II", data[16:24])
        return image.size


# ---- attention: the core function ---------------------------------------------------------------

def test_attention_weights_times_values_reproduce_the_fused_attention():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TOY)).eval()
    idx = torch.randint(0, 257, (2, 11))
    captured = {}
    hooks = []
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.ln_1.register_forward_hook(
            lambda m, args, out, i=i: captured.__setitem__(("ln_1", i), out)))
        hooks.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(("sdpa", i), args[0])))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    B, T, C, H = 2, 11, 32, 2
    for layer in range(2):
        w = model.attention_weights(idx, layer)  # (B, H, T, T)
        assert w.shape == (B, H, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))
        assert torch.all(w.triu(1) == 0)
        attn = model.transformer.h[layer].attn
        v = attn.c_attn(captured[("ln_1", layer)]).split(C, dim=2)[2]
        v = v.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, D)
        y = (w @ v).transpose(1, 2).reshape(B, T, C)
        torch.testing.assert_close(y, captured[("sdpa", layer)], atol=1e-5, rtol=1e-4)


def test_attention_map_heads_mean_and_range():
    torch.manual_seed(1)
    model = GPT(ModelConfig(**TOY)).eval()
    ids = [5, 9, 200, 3, 3, 17]
    heads = [attention_map(model, ids, 1, h) for h in range(2)]
    torch.testing.assert_close(attention_map(model, ids, 1), (heads[0] + heads[1]) / 2)
    with pytest.raises(MiniGPTError, match="^layer 2 is out of range") as e:
        attention_map(model, ids, 2)
    assert e.value.setting == "layer"
    with pytest.raises(MiniGPTError, match="^head 2 is out of range") as e:
        attention_map(model, ids, 0, 2)
    assert e.value.setting == "head"
    with pytest.raises(MiniGPTError, match="no tokens"):
        attention_map(model, [], 0)


# ---- inspect attention ---------------------------------------------------------------------------

def test_inspect_attention_json_is_a_causal_distribution_per_token(run_dir):
    text = "To be, or not"
    info = ok_json("inspect", "attention", "--model", run_dir, text, "--layer", 1, "--json")
    n = len(text.encode())
    assert info["ids"] == list(text.encode()) and "".join(info["tokens"]) == text
    assert info["layer"] == 1 and info["head"] is None and info["num_heads"] == 2
    assert info["step"] == 100
    w = np.array(info["weights"])
    assert w.shape == (n, n)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(np.triu(w, 1) == 0) and w[0, 0] == pytest.approx(1.0)
    per_head = [np.array(ok_json("inspect", "attention", "--model", run_dir, text, "--layer", 1,
                                 "--head", h, "--json")["weights"]) for h in range(2)]
    np.testing.assert_allclose((per_head[0] + per_head[1]) / 2, w, atol=1e-6)


def test_inspect_attention_heat_map_in_the_terminal(run_dir):
    out = ok_text("inspect", "attention", "--model", run_dir, "ab c\n", "--head", 0)
    assert "layer 0 of 2 · head 0" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+ ", line)]
    assert len(rows) == 5  # one row per token
    assert "␣" in out and "↵" in out  # whitespace tokens are visible
    assert "█" in rows[0]  # the first token attends only to itself: weight 1
    mean = ok_text("inspect", "attention", "--model", run_dir, "-", input_text="hello")
    assert "mean of 2 heads" in mean


def test_inspect_attention_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "attention.png"
    result = invoke("inspect", "attention", "--model", run_dir, "To be, or not", "--png", png,
                    "--json")
    assert result.exit_code == 0, result.output
    n = len(json.loads(result.stdout)["ids"])
    w, h = attention_figsize(n)
    assert png_size(png) == (round(w * DPI), round(h * DPI))
    assert str(png) in result.stderr


def test_inspect_attention_errors(run_dir, tmp_path):
    base = ("inspect", "attention", "--model", run_dir, "hello")
    assert_one_line_error(invoke(*base, "--layer", 2), "--layer 2", "0 to 1")
    assert_one_line_error(invoke(*base, "--head", 5), "--head 5", "0 to 1")
    assert_one_line_error(invoke(*base, "--layer", -1), "--layer -1")
    assert_one_line_error(invoke("inspect", "attention", "--model", run_dir, ""), "no tokens")
    assert_one_line_error(invoke("inspect", "attention", "--model", tmp_path / "nope", "hi"),
                          "does not exist")
    assert_one_line_error(invoke(*base, "--png", tmp_path / "no-such-dir" / "a.png"),
                          "cannot write")


def test_long_text_is_cut_to_the_context(run_dir):
    result = invoke("inspect", "attention", "--model", run_dir, "x" * 40, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["ids"]) == 32 and "first 32" in result.stderr


# ---- inspect run ---------------------------------------------------------------------------------

def test_inspect_run_json_series_and_summary_agree(run_dir):
    info = ok_json("inspect", "run", run_dir, "--json")
    train, val, s = info["train"], info["val"], info["summary"]
    assert train["step"] == list(range(10, 101, 10)) and val["step"] == [50, 100]
    assert train["loss"] == [m["loss"] for m in METRICS[:10]]
    assert len(train["lr"]) == len(train["tokens_per_sec"]) == len(train["step"])
    assert s["final_loss"] == train["loss"][-1] and s["min_loss"] == min(train["loss"])
    assert s["best_val_loss"] == min(val["val_loss"]) == 3.5 and s["best_val_step"] == 100
    assert s["peak_lr"] == max(train["lr"]) and s["final_lr"] == train["lr"][-1]
    assert s["mean_tokens_per_sec"] == pytest.approx(np.mean(train["tokens_per_sec"]))
    assert s["last_step"] == 100 and s["logged_steps"] == 10 and info["skipped_lines"] == 0


def test_inspect_run_charts_in_the_terminal(run_dir):
    out = ok_text("inspect", "run", run_dir)
    for label in ("training loss", "validation loss", "best 3.5000 at step 100", "learning rate",
                  "tokens/s", "step"):
        assert label in out
    braille = [line for line in out.splitlines() if any("⠁" <= c <= "⣿" for c in line)]
    assert len(braille) >= 10
    assert all(len(line) <= 100 for line in out.splitlines())


def test_inspect_run_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    result = invoke("inspect", "run", run_dir, "--png", png)
    assert result.exit_code == 0, result.output
    assert png_size(png) == (round(RUN_FIGSIZE[0] * DPI), round(RUN_FIGSIZE[1] * DPI))


def test_inspect_run_skips_a_half_written_line(run_dir):
    with (run_dir / layout.METRICS_FILE).open("a") as f:
        f.write('{"step": 110, "loss": 1.2, "lr"')
    result = invoke("inspect", "run", run_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_lines"] == 1 and "skipped 1" in result.stderr


def test_inspect_run_errors(run_dir, tmp_path):
    assert_one_line_error(invoke("inspect", "run", tmp_path / "nope"), "does not exist")
    (run_dir / layout.METRICS_FILE).unlink()
    assert_one_line_error(invoke("inspect", "run", run_dir), "no metrics.jsonl")
    (run_dir / layout.METRICS_FILE).write_text("")
    assert_one_line_error(invoke("inspect", "run", run_dir), "no training records")
    assert_one_line_error(invoke("inspect", "run", tmp_path), "not a minigpt run")


def test_png_without_matplotlib_is_a_one_line_error(run_dir, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    for args in (("inspect", "run", run_dir), ("inspect", "attention", "--model", run_dir, "hi")):
        result = invoke(*args, "--png", tmp_path / "x.png")
        assert_one_line_error(result, "matplotlib", "pip install 'minigpt[plot]'")
        assert not (tmp_path / "x.png").exists()


# ---- inspect data --------------------------------------------------------------------------------

def _split_texts(info: dict) -> dict[str, str]:
    """The file's text cut where the split sizes say (train first, then val)."""
    raw = TEXT.encode()
    cut = info["splits"]["train"]["bytes"]
    return {"train": raw[:cut].decode(), "val": raw[cut:].decode()}


def test_inspect_data_json_numbers_are_consistent(corpus):
    info = ok_json("inspect", "data", corpus, "--top", 5, "--json")
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


def test_inspect_data_lines_and_a_learned_tokenizer(corpus):
    info = ok_json("inspect", "data", corpus, "--unit", "line", "--tokenizer", "char", "--json")
    assert info["tokenizer"].startswith("char") and info["unit"] == "line"
    for name, text in _split_texts(info).items():
        s = splits = info["splits"][name]
        lines = [x for x in text.split("\n") if x.strip()]
        assert s["lengths"]["count"] == len(lines)
        assert s["lengths"]["measured_tokens"] == sum(len(x) for x in lines)  # a token a char
        assert s["tokens"] == len(text) and splits["documents"] > 0


def test_inspect_data_in_the_terminal_and_from_a_run(run_dir, corpus):
    out = ok_text("inspect", "data", corpus)
    for label in ("byte (vocabulary 257)", "bytes per token", "documents", "Tokens per document",
                  "Most frequent tokens", "train", "val", "␣"):
        assert label in out
    assert "█" in out
    from_run = ok_text("inspect", "data", "--model", run_dir)  # the run's dataset and tokenizer
    assert str(corpus) in from_run and "longer than the run's context of 32 tokens" in from_run


def test_inspect_data_errors(run_dir, corpus, tmp_path):
    assert_one_line_error(invoke("inspect", "data", tmp_path / "missing.txt"), "not found")
    assert_one_line_error(invoke("inspect", "data", "no-such-dataset"), "unknown dataset")
    assert_one_line_error(invoke("inspect", "data", corpus, "--unit", "word"), "--unit")
    assert_one_line_error(invoke("inspect", "data", corpus, "--model", run_dir, "--tokenizer",
                                 "byte"), "either")
    assert_one_line_error(invoke("inspect", "data"), "no dataset")
    assert_one_line_error(invoke("inspect", "data", corpus, "--tokenizer", "nope"), "unknown")


# ---- inspect tokenizer --dataset -----------------------------------------------------------------

def test_inspect_tokenizer_on_a_dataset(corpus):
    info = ok_json("inspect", "tokenizer", "byte", "--dataset", corpus, "--json")
    d = info["dataset"]
    assert d["split"] == "train" and d["tokens"] == d["bytes"] and d["bytes_per_token"] == 1.0
    assert TEXT.startswith(info["text"]) and info["text"].endswith("\n")  # its first lines
    val = ok_json("inspect", "tokenizer", "byte", "x", "--dataset", corpus, "--split", "val",
                  "--json")["dataset"]
    assert val["bytes"] + d["bytes"] == len(TEXT.encode())
    char = ok_json("inspect", "tokenizer", "char", "Speak", "--dataset", corpus, "--json")
    assert char["num_tokens"] == 5 and char["dataset"]["tokens"] == len(
        TEXT.encode()[:d["bytes"]].decode())
    out = ok_text("inspect", "tokenizer", "byte", "hi", "--dataset", corpus)
    assert "1.00 bytes per token" in out and "(train)" in out
    assert_one_line_error(invoke("inspect", "tokenizer", "byte", "--dataset", corpus, "--split",
                                 "test"), "test")


# ---- the pieces ----------------------------------------------------------------------------------

def test_split_units_across_chunks():
    chunks = ["a b\n", "\n  \nc\nd", "\n\ne\n"]
    assert list(datastats.split_units(chunks, "document")) == ["a b", "c\nd", "e\n"]
    assert list(datastats.split_units(chunks, "line")) == ["a b", "c", "d", "e"]


def test_lengths_histogram_bins_are_powers_of_two():
    lengths = datastats.Lengths("document", np.array([1, 2, 3, 4, 9, 9, 31, 32]), count=8,
                                measured_bytes=0)
    assert lengths.histogram() == [(1, 1, 1), (2, 3, 2), (4, 7, 1), (8, 15, 2), (16, 31, 1),
                                   (32, 63, 1)]
    assert lengths.to_dict()["median"] == 6.5
    gap = datastats.Lengths("line", np.array([5, 40]), count=2, measured_bytes=0)
    assert gap.histogram() == [(4, 7, 1), (8, 15, 0), (16, 31, 0), (32, 63, 1)]


def render(renderable, width: int) -> list[str]:
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def test_line_chart_fits_its_width_and_labels_its_axes():
    xs = list(range(0, 1000, 7))
    chart = charts.LineChart("loss", [charts.Series("train", xs, [math.exp(-x / 300) for x in xs]),
                                      charts.Series("val", [0, 500, 994], [1.0, 0.3, 0.05])],
                             height=6)
    lines = render(chart, 60)
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("loss") and "train" in lines[0] and "val" in lines[0]
    assert lines[1].split()[0] == "1" and "994" in lines[-2] and lines[-1].strip() == "step"
    assert sum(any("⠁" <= c <= "⣿" for c in line) for line in lines) == 6


def test_heat_map_shows_the_last_tokens_that_fit():
    n = 70
    w = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    heat_map = charts.HeatMap(w.tolist(), ["x"] * n)
    assert charts.HeatMap(w[:20, :20].tolist(), ["x"] * 20).layout(60) == (0, 2)
    start, cell = heat_map.layout(60)  # 1 cell per token when 2 do not fit, then the last ones
    assert 0 < start < n and cell == 1
    lines = render(heat_map, 60)
    assert all(len(line) <= 60 for line in lines)
    assert f"showing the last {n - start} of {n} tokens" in lines[-2]
    assert lines[1].split()[0] == str(start) and len(lines) == n - start + 3
    assert charts.bar(0.5, 4) == "██  " and charts.bar(1 / 32, 4) == "▏   "


def test_lengths_of_a_large_split_are_sampled_but_every_document_is_counted(corpus):
    from minigpt_cli.data.resolve import resolve_source

    source = resolve_source(str(corpus))
    tok = minigpt_tokenizers.create("byte")
    full = datastats.measure_lengths(source, "train", tok, "document")
    part = datastats.measure_lengths(source, "train", tok, "document", limit_bytes=200)
    assert not full.sampled and part.sampled and part.count == full.count
    assert 200 <= part.measured_bytes < full.measured_bytes
    assert list(part.tokens) == list(full.tokens[:len(part.tokens)])

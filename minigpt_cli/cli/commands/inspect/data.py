"""``minigpt inspect data | run | attention``: a dataset, a training run and attention, drawn.

Registered onto the ``inspect`` sub-app by :func:`minigpt_cli.commands.inspect.register`.
The numbers come from core modules (:mod:`~minigpt_cli.datastats`,
:mod:`~minigpt_cli.history`, :mod:`~minigpt_cli.attention`); the terminal charts from
:mod:`~minigpt_cli.charts` and the PNGs from :mod:`~minigpt_cli.figures`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from minigpt_cli import data, ui
from minigpt_cli.attention import attention_map, check_layer_head, scale_max
from minigpt_cli.charts import HeatMap, LineChart, Series, bar, visible
from minigpt_cli.checkpoint import (
    find_latest_run,
    is_run_dir,
    load_config,
    load_run,
    load_tokenizer,
)
from minigpt_cli.commands.inspect import emit_json, resolve_tokenizer, token_pieces
from minigpt_cli.datastats import UNITS, split_stats
from minigpt_cli.errors import CheckpointError, MiniGPTError
from minigpt_cli.history import read_history
from minigpt_cli.progress import DataProgress

BAR_WIDTH = 24  # cells of a histogram bar


def register(inspect_app: typer.Typer) -> None:
    inspect_app.command("data", epilog=DATA_EXAMPLES)(data_)
    inspect_app.command("run", epilog=RUN_EXAMPLES)(run_)
    inspect_app.command("attention", epilog=ATTENTION_EXAMPLES)(attention_)


def _wrote(path: Path) -> None:
    ui.err_console.print(Text(f"Wrote {path}", style="dim"), soft_wrap=True)


# ---- inspect data ------------------------------------------------------------------------------

DATA_EXAMPLES = """Examples:

  minigpt inspect data data/tinyshakespeare/input.txt

  minigpt inspect data stdlib-docs --tokenizer tiktoken:gpt2 --unit line

  minigpt inspect data --model runs/tiny --json    # the run's own dataset and tokenizer
"""


def _run_dir(model: Path) -> Path:
    if not model.exists():
        raise CheckpointError(f"--model {model} does not exist")
    if not is_run_dir(model):
        raise CheckpointError(f"{model} is not a minigpt run directory",
                              "pass a directory made by 'minigpt train'")
    return model


def _token_text(tokenizer) -> Any:
    """id -> its text; a byte that is only part of a character shows as <c3>."""
    def text(i: int) -> str:
        decoded = tokenizer.decode([i])
        if "\ufffd" in decoded and hasattr(tokenizer, "decode_bytes"):
            raw = tokenizer.decode_bytes([i])
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return "".join(f"<{b:02x}>" for b in raw)
        return decoded
    return text


@ui.guarded
def data_(
    dataset: Annotated[str | None, typer.Argument(
        help="Text file, folder, wikitext-2, wikitext-103, hf:NAME[:CONFIG] or stdlib-docs. "
             "Default with --model: the run's dataset.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer spec (byte, tiktoken:gpt2, ...); ones that learn a vocabulary learn "
             "it from the training split. Default: byte.")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Use this run's tokenizer (and its dataset and validation fraction "
                        "as defaults).")] = None,
    unit: Annotated[str, typer.Option(
        help="Lengths of: document (text between blank lines) or line.")] = "document",
    top: Annotated[int, typer.Option(help="How many of the most frequent tokens to list.")
                   ] = 10,
    val_fraction: Annotated[float | None, typer.Option(
        help="Share of a single text file held out as validation (default 0.1, or the "
             "run's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per split: sizes, lengths of documents or lines, and the most frequent tokens."""
    if unit not in UNITS:
        raise MiniGPTError(f"unknown --unit '{unit}'", f"use {' or '.join(UNITS)}")
    if top < 0:
        raise MiniGPTError(f"--top must be 0 or more, got {top}")
    if model is not None and tokenizer is not None:
        raise MiniGPTError("give either --model or --tokenizer, not both",
                           "--model uses the run's own tokenizer")
    config = load_config(_run_dir(model)) if model is not None else None
    if dataset is None:
        if config is None:
            raise MiniGPTError("no dataset given", "pass one, e.g. minigpt inspect data "
                               "stdlib-docs, or --model RUN for the run's own")
        dataset = config.data.dataset
    fraction = val_fraction if val_fraction is not None else (
        config.data.val_fraction if config is not None else 0.1)
    source = data.resolve_source(dataset, fraction)
    tok = load_tokenizer(model) if model is not None else resolve_tokenizer(
        tokenizer or "byte", lambda: source.iter_text("train"))
    view = DataProgress(ui.err_console) if not json_out and ui.err_console.is_terminal else None
    try:
        stats = [split_stats(source, split, tok, unit, top, progress=view)
                 for split in source.splits()]
    finally:
        if view is not None:
            view.close()
    piece = _token_text(tok)
    info = {"dataset": source.name, "tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            "unit": unit, "splits": {s.split: s.to_dict(piece) for s in stats}}
    if json_out:
        emit_json(info)
        return
    context = config.model.max_seq_length if config is not None else None
    ui.console.print(_data_view(info, context))


def _data_view(info: dict[str, Any], context: int | None) -> Group:
    splits = info["splits"]
    unit = info["unit"]
    head = Text(f"{info['dataset']} · {info['tokenizer']} (vocabulary {info['vocab_size']:,})",
                style="bold")
    summary = Table(box=None, padding=(0, 2), title_justify="left")
    summary.add_column("")
    for name in splits:
        summary.add_column(name, justify="right", style="bold" if name == "train" else None)

    def row(label: str, fn) -> None:
        summary.add_row(Text(label, style="dim"), *[fn(s) for s in splits.values()])

    row("bytes", lambda s: f"{s['bytes']:,}")
    row("tokens", lambda s: f"{s['tokens']:,}")
    row("bytes per token", lambda s: f"{s['bytes_per_token']:.2f}")
    row("words", lambda s: f"{s['words']:,}")
    row("lines", lambda s: f"{s['lines']:,}")
    row("documents", lambda s: f"{s['documents']:,}")
    for key in ("mean", "median", "p90", "max"):
        row(f"{unit} length, {key}",
            lambda s, key=key: "—" if s["lengths"][key] is None else f"{s['lengths'][key]:,.0f}")
    parts: list[Any] = [head, Text(), summary, Text()]

    hist = Table(title=f"Tokens per {unit}" + (" (non-blank lines)" if unit == "line" else ""),
                 title_justify="left", box=None, padding=(0, 1))
    hist.add_column("tokens", justify="right", style="dim")
    bins: dict[tuple[int, int], dict[str, int]] = {}
    for name, s in splits.items():
        hist.add_column(name)
        for b in s["lengths"]["histogram"]:
            bins.setdefault((b["lo"], b["hi"]), {})[name] = b["count"]
    peak = {name: max([b["count"] for b in s["lengths"]["histogram"]] or [1])
            for name, s in splits.items()}
    total = {name: max(s["lengths"]["measured"], 1) for name, s in splits.items()}
    for (lo, hi), counts in sorted(bins.items()):
        label = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
        cells = []
        for name in splits:
            c = counts.get(name, 0)
            share = 100 * c / total[name]
            cells.append(Text(bar(c / peak[name], BAR_WIDTH), style="cyan") + Text(
                " <0.1%" if 0 < share < 0.05 else f" {share:4.1f}%", style="dim"))
        hist.add_row(label, *cells)
    parts.append(hist)
    notes = ["documents: blocks of text between blank lines" if unit == "document" else
             "lines: non-blank lines, each encoded on its own"]
    if context is not None:
        over = [f"{name} {100 * _share_over(s['lengths']['histogram'], context):.1f}%"
                for name, s in splits.items()]
        notes.append(f"longer than the run's context of {context} tokens: " + ", ".join(over))
    sampled = [name for name, s in splits.items() if s["lengths"]["sampled"]]
    if sampled:
        notes.append(f"lengths measured on the first {splits[sampled[0]]['lengths']['measured']:,}"
                     f" {unit}s of large splits ({', '.join(sampled)})")
    parts += [Text(n, style="dim") for n in notes]

    if any(s["top_tokens"] for s in splits.values()):
        tops = Table(title="Most frequent tokens", title_justify="left", box=None,
                     padding=(0, 1))
        tops.add_column("#", justify="right", style="dim")
        for name in splits:
            tops.add_column(name)
            tops.add_column("id", justify="right", style="dim")
            tops.add_column("share", justify="right", style="dim")
        for rank in range(max(len(s["top_tokens"]) for s in splits.values())):
            cells: list[Any] = [str(rank + 1)]
            for s in splits.values():
                if rank < len(s["top_tokens"]):
                    t = s["top_tokens"][rank]
                    cells += [Text(repr(visible(t["token"]))[1:-1] or "·", style="bold"),
                              str(t["id"]), f"{100 * t['share']:.2f}%"]
                else:
                    cells += ["", "", ""]
            tops.add_row(*cells)
        parts += [Text(), tops]
    return Group(*parts)


def _share_over(histogram: list[dict[str, int]], context: int) -> float:
    """The share of lengths above ``context`` (bins that straddle it count in part)."""
    total = sum(b["count"] for b in histogram) or 1
    over = 0.0
    for b in histogram:
        if b["lo"] > context:
            over += b["count"]
        elif b["hi"] > context:
            over += b["count"] * (b["hi"] - context) / (b["hi"] - b["lo"] + 1)
    return over / total


# ---- inspect run -------------------------------------------------------------------------------

RUN_EXAMPLES = """Examples:

  minigpt inspect run    # the latest run under runs/

  minigpt inspect run runs/tiny --png tiny.png

  minigpt inspect run runs/tiny --json
"""


@ui.guarded
def run_(
    run: Annotated[Path | None, typer.Argument(
        help="Run directory (default: the latest run under runs/).")] = None,
    png: Annotated[Path | None, typer.Option(
        help="Also write the charts as a PNG image (needs matplotlib).")] = None,
    height: Annotated[int, typer.Option(help="Rows of the loss chart in the terminal.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the series as JSON.")] = False,
) -> None:
    """Training and validation loss, learning rate and tokens/s over steps, as charts."""
    if run is None:
        try:
            run = find_latest_run()
        except CheckpointError as e:
            raise CheckpointError(e.message, "pass a run directory: minigpt inspect run DIR, "
                                             "or train one with 'minigpt train'") from e
    history = read_history(run)
    if history.skipped_lines:
        ui.warn(f"skipped {history.skipped_lines} unreadable line(s) of metrics.jsonl")
    info = history.to_dict()
    s = info["summary"]
    title = f"{history.run_dir.name} · step {s['last_step']:,}"
    if png is not None:
        from minigpt_cli.figures import training_figure

        best = s["best_val_loss"]
        suffix = "" if best is None else f" · best validation loss {best:.4f}"
        _wrote(training_figure(info, png, title + suffix))
    if json_out:
        emit_json(info)
        return
    train, val = history.train, history.val
    rows = [("steps logged", f"{s['logged_steps']:,} (last step {s['last_step']:,})")]
    if s["final_loss"] is not None:
        rows.append(("training loss", f"{s['final_loss']:.4f} (lowest {s['min_loss']:.4f})"))
    if s["best_val_loss"] is not None:
        rows.append(("validation loss", f"{s['final_val_loss']:.4f} (best {s['best_val_loss']:.4f}"
                                        f" at step {s['best_val_step']:,})"))
    if s["peak_lr"] is not None:
        rows.append(("learning rate", f"{s['final_lr']:.2e} (peak {s['peak_lr']:.2e})"))
    if s["mean_tokens_per_sec"] is not None:
        rows.append(("tokens/s", f"{s['mean_tokens_per_sec']:,.0f} on average"))
    if s["elapsed"] is not None:
        rows.append(("elapsed", f"{ui.human_duration(s['elapsed'])} · {s['epochs']:.2f} epochs"))
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2), title_style="bold")
    table.add_column(style="dim")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    charts = [LineChart("loss", [Series("training", train["step"], train["loss"], "cyan"),
                                 Series("validation", val["step"], val["val_loss"], "yellow", "•")],
                        height=max(3, height)),
              LineChart("learning rate", [Series("lr", train["step"], train["lr"], "green")],
                        height=max(2, height // 2), fmt=lambda x: f"{x:.2e}"),
              LineChart("tokens/s", [Series("tokens/s", train["step"],
                                            train["tokens_per_sec"], "magenta")],
                        height=max(2, height // 2))]
    ui.console.print(Group(table, *[g for c in charts for g in (Text(), c)]))


# ---- inspect attention -------------------------------------------------------------------------

ATTENTION_EXAMPLES = """Examples:

  minigpt inspect attention --model runs/tiny 'To be, or not to be'

  minigpt inspect attention --model runs/tiny --layer 2 --head 1 'def f(x):' --png att.png

  echo 'from stdin' | minigpt inspect attention --model runs/tiny - --json
"""


@ui.guarded
def attention_(
    text: Annotated[str, typer.Argument(help="Text to look at ('-' reads standard input).")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Run directory (default: the latest run under runs/).")] = None,
    layer: Annotated[int, typer.Option(help="Layer, counted from 0.")] = 0,
    head: Annotated[int | None, typer.Option(
        help="Head, counted from 0 (default: the mean over the layer's heads).")] = None,
    png: Annotated[Path | None, typer.Option(
        help="Also write the heat map as a PNG image (needs matplotlib).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the weights as JSON.")
                        ] = False,
) -> None:
    """How much each token attends to every earlier one, as a heat map over the tokens."""
    run = load_run(model, "cpu")
    check_layer_head(run.model, layer, head)
    if text == "-":
        text = sys.stdin.read()
    ids = [int(i) for i in run.tokenizer.encode(text)]
    context = run.config.model.max_seq_length
    if len(ids) > context:
        ui.warn(f"the text is {len(ids):,} tokens; using the first {context} (the context)")
        ids = ids[:context]
    weights_t = attention_map(run.model, ids, layer, head)
    weights, vmax = weights_t.tolist(), scale_max(weights_t)
    pieces = token_pieces(run.tokenizer, ids)
    heads = run.config.model.num_heads
    which = f"head {head}" if head is not None else f"mean of {heads} heads"
    title = f"{run.run_dir.name} · layer {layer} of {run.config.model.num_layers} · {which}"
    if png is not None:
        from minigpt_cli.figures import attention_figure

        labels = [visible(p) or "·" for p in pieces]  # "": part of a character
        _wrote(attention_figure(weights, labels, png, title, vmax))
    if json_out:
        emit_json({"model": str(run.run_dir), "step": run.state.get("step"), "layer": layer,
                   "head": head, "num_layers": run.config.model.num_layers, "num_heads": heads,
                   "ids": ids, "tokens": pieces, "weights": weights})
        return
    ui.console.print(Text(title, style="bold"))
    ui.console.print(Text("rows: each token (query) · columns: the tokens it attends to (keys)",
                          style="dim"))
    ui.console.print(HeatMap(weights, pieces, vmax))

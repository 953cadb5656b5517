"""``minigpt inspect data``: a dataset as a tokenizer sees it, per split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.charts import bar, visible
from minigpt_cli.cli.commands.inspect.common import emit_json, resolve_tokenizer, token_text
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.run.layout import check_run_dir

NAME = "data"
BAR_WIDTH = 24  # cells of a histogram bar
EXAMPLES = """Examples:

  minigpt inspect data data/tinyshakespeare/input.txt

  minigpt inspect data stdlib-docs --tokenizer tiktoken:gpt2 --unit line

  minigpt inspect data --model runs/tiny --json    # the run's own dataset and tokenizer
"""


@ui.guarded
def command(
    dataset: Annotated[str | None, typer.Argument(
        help="Text file, .jsonl/.json/.parquet records, folder, wikitext-2, wikitext-103, "
             "tinyshakespeare, hf:NAME[:CONFIG] or stdlib-docs. "
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
    context: Annotated[int | None, typer.Option(
        help="Conversations: the context to fit them into (default: the run's, else 128).")
    ] = None,
    template: Annotated[str | None, typer.Option(
        help="Conversations: the chat template (default: the run's, else minigpt).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per split: sizes, lengths of documents or lines, and the most frequent tokens."""
    from minigpt_cli.chat.template import DEFAULT_CHAT_TEMPLATE, get_template
    from minigpt_cli.cli.progress import DataProgress
    from minigpt_cli.data.chat import ChatSource, chat_stats
    from minigpt_cli.data.resolve import resolve_source
    from minigpt_cli.data.stats import UNITS, split_stats
    from minigpt_cli.run.load import load_config, load_tokenizer


    if unit not in UNITS:
        raise MiniGPTError(f"unknown --unit '{unit}'", f"use {' or '.join(UNITS)}")
    if top < 0:
        raise MiniGPTError(f"--top must be 0 or more, got {top}")
    if model is not None and tokenizer is not None:
        raise MiniGPTError("give either --model or --tokenizer, not both",
                           "--model uses the run's own tokenizer")
    config = load_config(check_run_dir(model)) if model is not None else None
    if dataset is None:
        if config is None:
            raise MiniGPTError("no dataset given", "pass one, e.g. minigpt inspect data "
                               "stdlib-docs, or --model RUN for the run's own")
        dataset = config.data.dataset
    fraction = val_fraction if val_fraction is not None else (
        config.data.val_fraction if config is not None else 0.1)
    source = resolve_source(dataset, fraction,
                            config.data.format if config is not None else "auto")
    chat_template = None
    if isinstance(source, ChatSource):
        chat_template = get_template(template or (config.data.template if config is not None
                                                  else DEFAULT_CHAT_TEMPLATE), "template")
        source.template = chat_template
    tok = load_tokenizer(model) if model is not None else resolve_tokenizer(
        "byte" if tokenizer is None else tokenizer, lambda: source.iter_text("train"))
    window = context if context is not None else (
        config.model.max_seq_length if config is not None else 128)
    if window <= 0:
        raise MiniGPTError(f"--context must be positive, got {window}")
    chat_info = None
    if chat_template is not None:
        tok.add_special_tokens(chat_template.special_tokens)
        chat_info = chat_stats(source, tok, chat_template, window)
    with DataProgress.on_terminal(not json_out) as view:
        stats = [split_stats(source, split, tok, unit, top, progress=view)
                 for split in source.splits()]
    piece = token_text(tok)
    info = {"dataset": source.name, "tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            "unit": stats[0].lengths.unit if stats else unit,  # conversations: conversation
            "splits": {s.split: s.to_dict(piece) for s in stats}}
    if chat_info is not None:
        info["chat"] = chat_info
    if json_out:
        emit_json(info)
        return
    context = config.model.max_seq_length if config is not None else None
    ui.console.print(_data_view(info, context))


def _data_view(info: dict[str, Any], context: int | None) -> Group:
    from minigpt_cli.data.stats import CHAT_UNIT

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
    row("conversations" if unit == CHAT_UNIT else "documents",
        lambda s: f"{s['documents']:,}")
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
    notes = [{"document": "documents: blocks of text between blank lines",
              "line": "lines: non-blank lines, each encoded on its own",
              CHAT_UNIT: "tokens as training renders the conversations (a special token is one "
                         "id); bytes, words and lines of their text without those"}[unit]]
    if context is not None:
        over = [f"{name} {100 * _share_over(s['lengths']['histogram'], context):.1f}%"
                for name, s in splits.items()]
        notes.append(f"longer than the run's context of {context} tokens: " + ", ".join(over))
    sampled = [name for name, s in splits.items() if s["lengths"]["sampled"]]
    if sampled:
        notes.append(f"lengths measured on the first {splits[sampled[0]]['lengths']['measured']:,}"
                     f" {unit}s of large splits ({', '.join(sampled)})")
    parts += [Text(n, style="dim") for n in notes]
    chat = info.get("chat")
    if chat is not None:
        parts.append(Text())
        parts.append(Text(f"Conversations ({chat['template']} template, context "
                          f"{chat['context']:,} tokens)", style="bold"))
        for name, c in chat["splits"].items():
            parts.append(Text(
                f"{name}: {c['conversations']:,} conversations, {c['trained_tokens']:,} of "
                f"{c['tokens']:,} tokens trained (the assistant's); {c['cut']:,} cut to fit "
                f"the context ({c['truncated']:,} of them with a turn truncated)"))

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

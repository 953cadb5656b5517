"""``minigpt eval``: score trained runs on held-out text; loss, perplexity, bits per byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.errors import DataError, MiniGPTError

EXAMPLES = """Examples:

  minigpt eval    # the latest run, on its own validation split

  minigpt eval --model runs/tiny --dataset wikitext-2 --split test

  minigpt eval --model runs/a --model runs/b --text-file notes.txt --json

  minigpt eval --model runs/tiny --stride 64    # sliding windows, more history

  minigpt eval --model runs/small --dataset wikitext-2 --split test --quantize int8
"""

TOKENS_PER_BATCH = 4096  # default batch: about this many tokens per forward pass
PROGRESS_MIN_TOKENS = 20_000  # shorter inputs finish before a bar would help
TEXT_SPLIT = "text"  # the single split of a --text-file


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EXAMPLES)(eval_)


@ui.guarded
def eval_(
    model: Annotated[list[Path] | None, typer.Option(
        "--model", help="Run directory (repeatable: several give a side-by-side table). "
                        "Default: the latest run under runs/.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Text file, .jsonl/.json/.parquet records, folder, wikitext-2, wikitext-103, "
             "tinyshakespeare, hf:NAME[:CONFIG] or stdlib-docs. "
             "Default: the run's own dataset.")] = None,
    split: Annotated[str | None, typer.Option(
        help="Split of the dataset: train, val or test. Default: val.")] = None,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", help="Score the whole of this UTF-8 text file instead of a dataset.")
    ] = None,
    stride: Annotated[int | None, typer.Option(
        help="Slide windows by this many tokens (less than the context) so that each "
             "token has more history. Default: non-overlapping windows.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Windows per forward pass (default: about {TOKENS_PER_BATCH} tokens' worth).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto, fp32, bf16 or fp16 (with --quantize, auto is fp32).")] = "auto",
    quantize: Annotated[str, typer.Option(
        help="Also score the model quantised on the CPU (none, int8 or int4) and report "
             "the change in bits per byte against the unquantised model.")] = "none",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                        ] = False,
) -> None:
    """Evaluate models on held-out text: loss, perplexity, bits per byte, word perplexity."""
    if text_file is not None and dataset is not None:
        raise MiniGPTError("give either --dataset or --text-file, not both")
    if text_file is not None and split is not None:
        raise MiniGPTError("--split applies to a dataset; --text-file is scored whole")
    if batch_size is not None and batch_size < 1:
        raise MiniGPTError(f"--batch-size must be positive, got {batch_size}")
    import torch

    from minigpt_cli.data.chat import ChatSource
    from minigpt_cli.data.resolve import resolve_source
    from minigpt_cli.device import configure_backends, select_device, select_precision
    from minigpt_cli.evaluate.perplexity import check_stride, record, result_key
    from minigpt_cli.generate.quant import check_quantize, int4_fallback_note, quantize_model
    from minigpt_cli.run.load import load_run

    dev = select_device(device)
    configure_backends(dev)
    quantize = check_quantize(quantize, dev)
    prec = select_precision("fp32" if quantize and precision == "auto" else precision, dev)
    text_source = _text_file_source(text_file) if text_file is not None else None
    show_progress = not json_out and ui.err_console.is_terminal

    results: list[dict[str, Any]] = []
    saved_to: list[Path] = []
    for path in model or [None]:
        run = load_run(path, dev)
        seq_len = run.config.model.max_seq_length
        check_stride(stride, seq_len)
        if text_source is not None:
            source, split_name, label = text_source, TEXT_SPLIT, str(text_file)
        else:
            label = dataset or run.config.data.dataset
            source = resolve_source(label, run.config.data.val_fraction,
                                    run.config.data.format)
            split_name = source.check_split(split or "val")
        chat = isinstance(source, ChatSource)
        if chat and stride is not None:
            raise MiniGPTError("--stride applies to text; conversations are scored whole")
        packed = _packed(source, split_name, run) if chat else None
        tokens = None if chat else _tokens(source, split_name, run.tokenizer, show_progress)
        batch = batch_size or max(1, TOKENS_PER_BATCH // seq_len)

        data = packed if chat else tokens
        job = (run.model, data, seq_len, batch, dev, prec, stride, show_progress)
        res = _score(run.run_dir.name, *job)
        compared: dict[str, Any] = {}
        if quantize:
            plain = res.to_dict()
            quantize_model(run.model, quantize)
            if note := int4_fallback_note(run.model, quantize):
                ui.warn(note)
            res = _score(f"{run.run_dir.name} ({quantize})", *job)
            compared = {"unquantized": plain,
                        "bits_per_byte_change": _relative(res.bits_per_byte,
                                                          plain["bits_per_byte"])}
        is_file = text_source is not None
        entry: dict[str, Any] = {
            "model": str(run.run_dir), "step": run.state.get("step"),
            "dataset": label, "split": None if is_file else split_name,
            "stride": stride, "context": seq_len, "tokenizer": run.tokenizer.spec,
            "device": str(dev), "precision": prec.name, "quantize": quantize,
            **res.to_dict(), **compared,
            "scored": "assistant tokens" if chat else "all tokens",
        }
        key = result_key(f"file:{Path(label).resolve()}" if is_file else label,
                         None if is_file else split_name, stride)
        if quantize:  # beside the unquantised result, not over it
            key += f"@{quantize}"
        try:
            saved_to.append(record(run.run_dir, key, entry))
        except OSError as e:
            ui.warn(f"could not write {run.run_dir / 'eval.json'}: {e.strerror or e}")
        results.append(entry)
        del run
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if json_out:
        typer.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        ui.console.print(_table(results))
        saved = ", ".join(str(p) for p in saved_to)
        if saved:
            ui.err_console.print(Text(f"Saved to {saved}", style="dim"), soft_wrap=True)


def _score(what: str, model, data, seq_len: int, batch: int, dev, prec, stride: int | None,
           show_progress: bool):
    """Score ``data``: a text's tokens, or packed conversations (assistant tokens only)."""
    import torch

    from minigpt_cli.evaluate.perplexity import evaluate, evaluate_masked

    with _EvalProgress(f"evaluating {what}", show_progress) as progress:
        try:
            if getattr(data, "mask", None) is not None:
                return evaluate_masked(model, data.tokens, data.mask, seq_len, batch, dev,
                                       prec, progress=progress)
            return evaluate(model, data.tokens, seq_len, batch, dev, prec, stride=stride,
                            progress=progress, num_bytes=data.num_bytes,
                            num_words=data.num_words)
        except torch.cuda.OutOfMemoryError as e:
            raise MiniGPTError(f"out of memory on {dev} with batches of {batch} windows",
                               "pass a smaller --batch-size") from e


def _text_file_source(path: Path):
    """The whole of one text file as a single split (encoded through the token cache)."""
    from minigpt_cli.data.files import BOM, FileSource, Segment, check_text_file

    if path.is_dir():
        raise DataError(f"--text-file {path} is a folder", "pass a text file, or a folder "
                        "with train/valid/test files as --dataset")
    if not path.exists():
        raise DataError(f"--text-file {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(len(BOM) + 1)
    except OSError as e:
        raise DataError(f"cannot read --text-file {path}: {e.strerror or e}") from e
    if head in (b"", BOM):
        raise DataError(f"--text-file {path} is empty", "give a file with some text in it")
    start = check_text_file(path)  # binary and non-UTF-8 files are errors
    return FileSource(str(path), {TEXT_SPLIT: [Segment(path, start, path.stat().st_size)]})


def _packed(source, split: str, run):
    """Conversations rendered with the run's template, packed as training packs them."""
    from minigpt_cli.chat.template import TEMPLATES, saved_template_name, template_for_run
    from minigpt_cli.data.chat import chat_token_cache, pack

    template = (template_for_run(run.run_dir) if saved_template_name(run.run_dir)
                else TEMPLATES.get(run.config.data.template, TEMPLATES["plain"]))
    template.check_tokenizer(run.tokenizer)
    source.template = template
    cached = chat_token_cache(source, split, run.tokenizer, template)
    return pack(cached, run.config.model.max_seq_length, run.tokenizer.eot_id)


def _tokens(source, split: str, tokenizer, show_progress: bool):
    from minigpt_cli.cli.progress import DataProgress
    from minigpt_cli.data.token_cache import token_cache

    with DataProgress.on_terminal(show_progress) as view:
        return token_cache(source, split, tokenizer, progress=view.for_stage("tokenizing"))


class _EvalProgress:
    """A transient progress bar on stderr, shown only for long inputs on a terminal."""

    def __init__(self, description: str, enabled: bool):
        self.description = description
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        return self if self.enabled else None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            if total < PROGRESS_MIN_TOKENS:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("tokens"),
                                      TimeRemainingColumn(), console=ui.err_console,
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _relative(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return (value - reference) / reference


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:.3e}"
    return format(value, spec)


ROWS = [
    ("loss (nats/token)", "loss", ".4f"),
    ("perplexity", "perplexity", ",.2f"),
    ("bits per byte", "bits_per_byte", ".4f"),
    ("word perplexity", "word_perplexity", ",.2f"),
    ("tokens scored", "tokens", ","),
    ("bytes", "bytes", ","),
    ("words", "words", ","),
]


def _short(label: str, width: int = 24) -> str:
    """A long file path as its last component, so the table keeps its shape."""
    if len(label) <= width or "/" not in label:
        return label
    return "…/" + Path(label).name


def _table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="minigpt eval", title_justify="left")
    table.add_column("")
    for r in results:
        step = "" if r["step"] is None else f" · step {r['step']:,}"
        table.add_column(Text(f"{Path(r['model']).name}{step}"), justify="right")
    label = [Text(_short(r["dataset"]) + (f" ({r['split']})" if r["split"] else ""))
             for r in results]
    table.add_row(Text("data", style="dim"), *label)
    window = [Text(f"{r['context']}" + (f", stride {r['stride']}" if r["stride"] else ""))
              for r in results]
    table.add_row(Text("context", style="dim"), *window)
    table.add_row(Text("tokenizer", style="dim"), *[Text(r["tokenizer"]) for r in results],
                  end_section=True)
    for title, key, spec in ROWS:
        table.add_row(Text(title), *[_fmt(r[key], spec) for r in results])
    if any(r.get("quantize") for r in results):
        table.add_row(Text("quantized", style="dim"), *[Text(r["quantize"] or "no")
                                                       for r in results], end_section=True)
        table.add_row(Text("bits per byte unquantized"), *[
            _fmt(r["unquantized"]["bits_per_byte"] if r.get("quantize") else None, ".4f")
            for r in results])
        table.add_row(Text("bits per byte change"), *[
            _fmt(100 * c if (c := r.get("bits_per_byte_change")) is not None else None,
                 "+.3f") + ("%" if r.get("bits_per_byte_change") is not None else "")
            for r in results])
    return table

"""Pieces the ``inspect`` subcommands share: JSON output, key-value tables, tokenizers by
spec or run directory, and the text of each token."""

from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.errors import MiniGPTError, TokenizerError
from minigpt_cli.run.layout import TOKENIZER_DIR, is_run_dir

if TYPE_CHECKING:
    from minigpt_tokenizers import TextSource

MAX_PREFIX_DECODE = 2000  # longer texts: decode each token alone instead of by prefixes


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def read_stdin() -> str:
    """Standard input as UTF-8 text, whatever the locale; a MiniGPTError when it is not."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MiniGPTError(f"the text on stdin is not UTF-8 (bad byte at offset {e.start})",
                           "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from e


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table; values are shown literally (never as markup)."""
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class _NeedsTraining(Exception):
    """Raised by the stand-in training text: the tokenizer wanted to learn a vocabulary."""


def _no_training_text():
    raise _NeedsTraining


def resolve_tokenizer(spec: str, training_text: TextSource | None = None):
    """A tokenizer from a spec, a run directory or a run's tokenizer/ folder.

    A spec that learns its vocabulary (char, sentencepiece) learns it from
    ``training_text``; without one, that is an error that points to a run directory.
    """
    import minigpt_tokenizers

    path = Path(spec).expanduser()
    if spec.strip() and path.is_dir():  # Path("") is the current folder
        from minigpt_cli.run.load import load_tokenizer

        if is_run_dir(path) or (path / TOKENIZER_DIR / minigpt_tokenizers.META_FILE).is_file():
            return load_tokenizer(path)
        if (path / minigpt_tokenizers.META_FILE).is_file():
            return minigpt_tokenizers.load(path)
        raise TokenizerError(f"{spec} is a folder but not a run directory",
                             "pass a directory made by 'minigpt train', or a spec like byte")
    name, _ = minigpt_tokenizers.parse_spec(spec)
    if ("/" in name or os.sep in name) and ":" not in spec:
        raise TokenizerError(f"no such run directory: {spec}",
                             "pass a run directory or a tokenizer spec such as byte")
    try:
        return minigpt_tokenizers.create(spec, training_text=training_text or _no_training_text)
    except _NeedsTraining:
        raise TokenizerError(f"the '{spec}' tokenizer learns its vocabulary from training text",
                             "pass a run directory to see a trained one (minigpt inspect "
                             "tokenizer runs/NAME), or --dataset to learn one") from None


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, so that the pieces concatenate to the decoded text.

    Decoding growing prefixes keeps multi-byte characters that span several tokens whole
    (the piece goes to the token that completes the character) and keeps tokenizers that
    drop a leading space when a token is decoded alone honest. With ``decode_bytes`` the
    prefixes are decoded from their bytes, so that only an unfinished character waits and
    a U+FFFD of the text (a ``char`` tokenizer's unknown character) stays with its token;
    without it, every U+FFFD at the end of a prefix is taken for an unfinished character.
    """
    if len(ids) > MAX_PREFIX_DECODE:
        return [tokenizer.decode([i]) for i in ids]
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    pieces, emitted = [], ""
    for i in range(len(ids)):
        last = i + 1 == len(ids)
        if decode_bytes is not None:  # an unfinished character waits for its last byte
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(
                decode_bytes(ids[:i + 1]), final=last)
        else:
            text = tokenizer.decode(ids[:i + 1])
            if not last:
                text = text.rstrip("\ufffd")
        common = os.path.commonprefix([emitted, text])
        pieces.append(text[len(common):])
        emitted = text
    return pieces


def wrote(path: Path) -> None:
    ui.err_console.print(Text(f"Wrote {path}", style="dim"), soft_wrap=True)


def token_text(tokenizer) -> Any:
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

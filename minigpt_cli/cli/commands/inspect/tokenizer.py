"""``minigpt inspect tokenizer``: how a tokenizer cuts text, and its bytes per token."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.commands.inspect.common import (
    emit_json,
    read_stdin,
    resolve_tokenizer,
    token_pieces,
)

NAME = "tokenizer"
SAMPLE_TEXT = "Hello, world! Tokenizers cut text into pieces: naïve café, 3.14159, def f(x):"
TOKEN_STYLES = ("black on cyan", "black on yellow")
EXAMPLES = """Examples:

  minigpt inspect tokenizer byte 'Hello, world!'

  minigpt inspect tokenizer tiktoken:gpt2 'Hello, world!' --json

  minigpt inspect tokenizer runs/tiny 'How does my run cut this?'

  minigpt inspect tokenizer tiktoken:gpt2 --dataset data/tinyshakespeare/input.txt

  echo 'from stdin' | minigpt inspect tokenizer byte -
"""


@ui.guarded
def command(
    spec: Annotated[str, typer.Argument(
        help="A tokenizer spec (byte, tiktoken:gpt2, ...) or a run directory.")],
    text: Annotated[str | None, typer.Argument(
        help="Text to tokenize ('-' reads standard input). Default: a sample, or the start "
             "of --dataset.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Also measure bytes per token on a dataset: a text file, folder, wikitext-2, "
             "hf:NAME[:CONFIG] or stdlib-docs. Tokenizers that learn a vocabulary learn it "
             "from its training split.")] = None,
    split: Annotated[str, typer.Option(help="Split of --dataset to measure.")] = "train",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show how a tokenizer cuts text into tokens, with their ids."""
    from minigpt_cli.data.resolve import resolve_source


    source = resolve_source(dataset) if dataset is not None else None
    tok = resolve_tokenizer(spec, None if source is None else lambda: source.iter_text("train"))
    corpus = _dataset_ratio(source, split, tok, show_progress=not json_out) if source else None
    if text is None:
        text = SAMPLE_TEXT if source is None else _opening(source, corpus["split"])
    elif text == "-":
        text = read_stdin()
    ids = [int(i) for i in tok.encode(text)]
    pieces = token_pieces(tok, ids)
    num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    per_token = num_bytes / len(ids) if ids else None
    info = {"spec": tok.spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "text": text,
            "ids": ids, "tokens": pieces, "num_tokens": len(ids), "num_bytes": num_bytes,
            "bytes_per_token": per_token, "dataset": corpus}
    if json_out:
        emit_json(info)
        return
    shown = Text()
    for i, piece in enumerate(pieces):  # a newline gets a visible mark to carry its colour
        shown.append(piece.replace("\n", "↵\n"), style=TOKEN_STYLES[i % len(TOKEN_STYLES)])
    ratio = "—" if per_token is None else f"{per_token:.2f}"
    ui.console.print(Text(f"{tok.spec} · vocabulary {tok.vocab_size:,} · end-of-text id "
                          f"{tok.eot_id}", style="bold"))
    ui.console.print(shown)
    if ui.console.color_system is None:  # no colours to show the boundaries: list the pieces
        ui.console.print(Text("tokens: ", style="dim") + Text(" ".join(map(repr, pieces))))
    ui.console.print(Text("ids: ", style="dim") + Text(" ".join(map(str, ids))))
    ui.console.print(Text(f"{len(ids):,} tokens · {num_bytes:,} bytes · {ratio} bytes per token",
                          style="dim"))
    if corpus is not None:
        ui.console.print(Text(f"{corpus['name']} ({corpus['split']}): {corpus['tokens']:,} "
                              f"tokens · {corpus['bytes']:,} bytes · "
                              f"{corpus['bytes_per_token']:.2f} bytes per token", style="bold"))


OPENING_CHARS = 300  # of a dataset, shown when no text is given


def _opening(source, split: str) -> str:
    """The first lines of a split, about ``OPENING_CHARS`` long."""
    head = next(iter(source.iter_text(split)), "")[:OPENING_CHARS * 2]
    cut = head.rfind("\n", 0, OPENING_CHARS) + 1
    return head[:cut] if cut > 0 else head[:OPENING_CHARS]


def _dataset_ratio(source, split: str, tok, show_progress: bool) -> dict[str, Any]:
    """Bytes per token over a whole split, from the token cache (encoded once, then reused)."""
    from minigpt_cli.cli.progress import DataProgress
    from minigpt_cli.data.token_cache import token_cache

    split = source.check_split(split)
    with DataProgress.on_terminal(show_progress) as view:
        arr = token_cache(source, split, tok, progress=view.for_stage(f"tokenizing {split}"))
    return {"name": source.name, "split": split, "bytes": arr.num_bytes,
            "tokens": arr.num_tokens, "bytes_per_token": arr.num_bytes / arr.num_tokens}

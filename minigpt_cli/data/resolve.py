"""Turning the ``data.dataset`` setting into a :class:`~minigpt_cli.data.source.DataSource`.

Accepted forms, checked in this order:

* ``hf:NAME[:CONFIG]`` - a Hugging Face dataset with a text column (see ``hub.py``);
  ``wikitext-2`` and ``wikitext-103`` are shortcuts for ``Salesforce/wikitext`` (raw
  configs).
* ``stdlib-docs`` - the built-in corpus of standard-library docstrings (``corpus.py``).
  Built-in names win over a same-named local file; write ``./stdlib-docs`` for the file.
* ``tinyshakespeare`` - downloaded once into the cache.
* a file of records: JSON Lines (``.jsonl``) whose first line is an object, a ``.json`` file
  of objects, or ``.parquet``; read through ``datasets`` by their text column (``hub.py``).
* a text file - the last ``val_fraction`` of its bytes, cut just after the first newline at
  or past that point (before it when there is none), is validation; the rest is training.
* a folder with ``train.txt``/``valid.txt``/``val.txt``/``validation.txt``/``test.txt`` or
  WikiText's ``wiki.{train,valid,test}.{tokens,raw}``. Without a validation file, the train
  file is split by position as for a single file.

Conversations (``chat.py``): a JSONL file whose first line is ``{"messages": [...]}``, a
folder with ``train.jsonl`` (and ``valid.jsonl``), or ``hf:NAME`` with a ``messages``
column are read as chat data; ``fmt`` (``data.format``) ``chat`` insists on it and ``text``
reads them, and files of records, as plain text.
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt_cli import paths
from minigpt_cli.data import chat, corpus, hub
from minigpt_cli.data.files import (
    FileSource,
    Segment,
    check_text_file,
    folder_source,
    split_by_position,
)
from minigpt_cli.data.source import DataSource
from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_write

ACCEPTED = ("a text file, a .jsonl/.json/.parquet file of records with a text column, a "
            "folder with train/valid/test text files, wikitext-2, "
            "wikitext-103, tinyshakespeare, hf:NAME[:CONFIG] or stdlib-docs")


def resolve_source(dataset: str, val_fraction: float = 0.1, fmt: str = "auto", *,
                   cache_dir: Path | None = None) -> DataSource:
    """Turn ``data.dataset`` into a :class:`DataSource` (forms in the module docstring).

    ``cache_dir`` is only used by the built-in and downloaded corpora (default:
    :func:`minigpt_cli.paths.cache_dir`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}",
                        setting="val_fraction")
    spec = dataset.strip()
    if not spec:
        raise DataError("no dataset given", f"use {ACCEPTED}")
    if spec in ("wikitext-2", "wikitext-103") or spec.startswith("hf:"):
        if spec.startswith("hf:"):
            path, _, config = spec[3:].partition(":")
            if not path.strip():
                raise DataError(f"'{spec}' names no dataset", "write hf:NAME or hf:NAME:CONFIG")
            return hub.hub_source(path.strip(), config.strip() or None, val_fraction, spec,
                                  fmt)
        return hub.HubSource("Salesforce/wikitext", f"{spec}-raw-v1", val_fraction, spec)
    if spec == "stdlib-docs":
        return _stdlib_docs(val_fraction, cache_dir)
    if spec == "tinyshakespeare":
        path = _download(TINYSHAKESPEARE_URL, "tinyshakespeare.txt", cache_dir)
        return FileSource(spec, split_by_position(
            Segment(path, check_text_file(path), path.stat().st_size), val_fraction))
    path = Path(spec).expanduser()
    if path.is_file() and (fmt == "chat" or (fmt == "auto" and chat.looks_like_chat(path))):
        return chat.file_source(spec, path, val_fraction)
    builder = _records_builder(path) if path.is_file() and fmt != "text" else None
    if builder is not None:
        return hub.hub_source(builder, None, val_fraction, spec, fmt, data_files=str(path))
    if path.is_dir():
        _check_folder(path)
    if path.is_dir() and fmt != "text" and (fmt == "chat" or chat.chat_folder_files(path)):
        return chat.folder_source(spec, path, val_fraction)
    if path.is_file():
        start = check_text_file(path)
        return FileSource(spec, split_by_position(Segment(path, start, path.stat().st_size),
                                                   val_fraction))
    if path.is_dir():
        return folder_source(spec, path, val_fraction)
    if path.exists():
        raise DataError(f"{spec} is neither a file nor a folder", f"use {ACCEPTED}")
    looks_like_path = os.sep in spec or "/" in spec or "." in Path(spec).name
    what = "file or folder not found" if looks_like_path else "unknown dataset"
    raise DataError(f"{what}: {spec}", f"use {ACCEPTED}")


def _records_builder(path: Path) -> str | None:
    """``json`` or ``parquet`` for a file of records (JSON Lines whose first line is an
    object, a JSON file of objects, a Parquet file), read by ``datasets`` through its text
    column; None for anything else, which is read as text."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix not in (*chat.JSON_LINES, ".json"):
        return None
    if suffix == ".json":
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")
        except OSError:
            return None  # the text reader says why
        return "json" if head[:1] in (b"[", b"{") else None
    return "json" if isinstance(chat.first_json_line(path), dict) else None


def _check_folder(path: Path) -> None:
    """A DataError naming the folder when its files cannot be listed or looked at."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
        os.stat(os.path.join(path, "."))  # needs the right to search it
    except PermissionError as e:
        raise DataError(f"cannot read the folder {path}: {e.strerror or e}",
                        "check its permissions") from e


TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")


def _download(url: str, name: str, cache_dir: Path | None) -> Path:
    """A file from ``url``, fetched once into the cache (``downloads/``) and reused."""
    folder = Path(cache_dir or paths.cache_dir()) / "downloads"
    path = folder / name
    if path.is_file() and path.stat().st_size > 0:
        return path
    import urllib.request

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise DataError(f"cannot download {name} from {url} ({getattr(e, 'reason', e)})",
                        "with no network, pass the file itself as the dataset: path/to/input.txt"
                        ) from e
    atomic_write(path, data)
    return path


def _stdlib_docs(val_fraction: float, cache_dir: Path | None) -> FileSource:
    text_path, index, _ = corpus.load_or_extract(Path(cache_dir or paths.cache_dir()))
    parts = {split: [Segment(text_path, a, b) for a, b in ranges]
             for split, ranges in corpus.split_ranges(index, val_fraction).items()}
    return FileSource(corpus.NAME, parts, kind="corpus")

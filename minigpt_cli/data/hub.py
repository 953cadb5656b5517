"""Hugging Face datasets as a :class:`~minigpt_cli.data.source.DataSource`.

``datasets`` is imported only here, and only when such a source is resolved (it is slow to
import). The text column is ``text`` when the dataset has one, else its first string
column. Splits named ``validation``/``valid``/``val``/``dev`` become ``val``; without one,
the last ``val_fraction`` of the training rows is carved off as ``val``.

Rows are joined into chunks of about 2 MB. A row that does not end in a newline (a whole
document, or WikiText's empty rows) gets one, so rows are separated by ``\\n`` and no
end-of-text tokens are inserted.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from minigpt_cli.data.source import CHUNK_BYTES, SPLITS, DataSource
from minigpt_cli.errors import DataError

OFFLINE_HINT = ("check the network, or use a local text file or folder, or the built-in "
                "stdlib-docs corpus")
VAL_NAMES = ("validation", "valid", "val", "dev")
ROWS_PER_READ = 1000
JOIN_VERSION = 1


class HubSource(DataSource):
    """A dataset from the Hugging Face Hub (or its local cache)."""

    def __init__(self, path: str, config: str | None, val_fraction: float = 0.1,
                 name: str | None = None, dsd: Any = None, data_files: str | None = None):
        self.name = name or (f"hf:{path}:{config}" if config else f"hf:{path}")
        self.path, self.config, self.data_files = path, config, data_files
        dsd = load(path, config, self.name, data_files) if dsd is None else dsd
        # canonical split -> (hf split name, first row, end row)
        self._parts: dict[str, tuple[str, int, int]] = {}
        self._data: dict[str, Any] = {}
        for hf_split in dsd:
            canonical = "val" if hf_split in VAL_NAMES else hf_split
            if canonical not in self._parts:
                self._parts[canonical] = (hf_split, 0, len(dsd[hf_split]))
                self._data[hf_split] = dsd[hf_split]
        if "train" not in self._parts:
            raise DataError(f"{self.name} has no train split",
                            f"its splits are {', '.join(dsd)}")
        self.column = text_column(self._data[self._parts["train"][0]], self.name)
        if "val" not in self._parts:
            hf_split, _, n = self._parts["train"]
            n_val = max(1, int(n * val_fraction))
            if n - n_val < 1:
                raise DataError(f"{self.name} has too few training rows ({n}) to carve a "
                                "validation split from", "use a larger dataset")
            self._parts["train"] = (hf_split, 0, n - n_val)
            self._parts["val"] = (hf_split, n - n_val, n)
        order = [s for s in SPLITS if s in self._parts]
        self._parts = {s: self._parts[s] for s in order + sorted(set(self._parts) - set(order))}

    def splits(self) -> list[str]:
        return list(self._parts)

    def _rows(self, split: str) -> tuple[Any, int, int]:
        hf_split, lo, hi = self._parts[self.check_split(split)]
        return self._data[hf_split], lo, hi

    def iter_text(self, split: str) -> Iterator[str]:
        ds, lo, hi = self._rows(split)
        if self.column not in ds.column_names:
            raise DataError(f"the {split} split of {self.name} has no '{self.column}' column")
        ds = ds.select_columns([self.column])
        pieces: list[str] = []
        size = 0
        for i in range(lo, hi, ROWS_PER_READ):
            for row in ds[i:min(i + ROWS_PER_READ, hi)][self.column]:
                row = row or ""
                if not row.endswith("\n"):
                    row += "\n"
                pieces.append(row)
                size += len(row)
                if size >= CHUNK_BYTES:
                    yield "".join(pieces)
                    pieces, size = [], 0
        if pieces:
            yield "".join(pieces)

    def fingerprint(self, split: str) -> str:
        ds, lo, hi = self._rows(split)
        hf_split = self._parts[self.check_split(split)][0]
        ident = (f"hf-v{JOIN_VERSION}\0{self.path}\0{self.config}\0{hf_split}\0{lo}\0{hi}\0"
                 f"{self.column}\0{getattr(ds, '_fingerprint', '')}")
        if self.data_files is not None:  # a local file: its own identity too
            st = os.stat(self.data_files)
            ident += f"\0{os.path.abspath(self.data_files)}\0{st.st_size}\0{st.st_mtime_ns}"
        return hashlib.sha256(ident.encode()).hexdigest()

    def size_hint(self, split: str) -> int:
        """UTF-8 bytes of the joined text, from Arrow string lengths (0 if unavailable)."""
        ds, lo, hi = self._rows(split)
        try:
            import pyarrow.compute as pc

            col = ds.data.column(self.column).slice(lo, hi - lo)
            with_newline = pc.sum(pc.ends_with(col, "\n")).as_py() or 0
            return int((pc.sum(pc.binary_length(col)).as_py() or 0) + (hi - lo) - with_newline)
        except Exception:  # only a progress estimate
            return 0

    def describe(self) -> dict[str, Any]:
        files = {} if self.data_files is None else {"data_files": self.data_files}
        return {"name": self.name, "kind": "hf", "path": self.path, "config": self.config,
                **files, "text_column": self.column,
                "splits": {s: {"hf_split": p[0], "rows": p[2] - p[1]}
                           for s, p in self._parts.items()}}


def hub_source(path: str, config: str | None, val_fraction: float, name: str,
               fmt: str = "auto", data_files: str | None = None) -> DataSource:
    """A text source, or conversations when the dataset has a ``messages`` column (unless
    ``fmt`` is ``text``; ``chat`` insists on one). With ``data_files``, ``path`` is one of
    ``datasets``' own builders (``json``, ``parquet``) reading that local file."""
    dsd = load(path, config, name, data_files)
    first = dsd[next(iter(dsd))]
    has_messages = "messages" in (getattr(first, "column_names", None) or [])
    if fmt == "chat" and not has_messages:
        raise DataError(f"{name} has no 'messages' column, so it is not chat data",
                        "set data.format to text, or use a dataset of conversations")
    if fmt == "text" or not has_messages:
        return HubSource(path, config, val_fraction, name, dsd, data_files)
    return _chat_source(dsd, val_fraction, name)


def _chat_source(dsd: Any, val_fraction: float, name: str) -> DataSource:
    from minigpt_cli.data.chat import ChatSource, check_conversation, split_last

    parts: dict[str, list] = {}
    for hf_split in dsd:
        canonical = "val" if hf_split in VAL_NAMES else hf_split
        if canonical in parts:
            continue
        rows = dsd[hf_split]["messages"]
        parts[canonical] = [check_conversation({"messages": m}, f"{name} {hf_split} row {i}")
                            for i, m in enumerate(rows)]
    if "train" not in parts:
        raise DataError(f"{name} has no train split", f"its splits are {', '.join(dsd)}")
    if "val" not in parts:
        parts.update(split_last(parts.pop("train"), val_fraction, name))
    order = [s for s in SPLITS if s in parts]
    return ChatSource(name, {s: parts[s] for s in order + sorted(set(parts) - set(order))})


def text_column(ds: Any, name: str) -> str:
    """``text`` if present, else the first string column; a DataError when there is none."""
    features = getattr(ds, "features", None) or {}
    strings = [col for col, feat in features.items()
               if getattr(feat, "dtype", None) in ("string", "large_string")]
    if "text" in strings:
        return "text"
    if not strings and "text" in features:
        raise DataError(f"{name}: its 'text' column does not hold strings only "
                        f"({getattr(features['text'], 'dtype', features['text'])})",
                        "every row's text must be a string")
    if not strings:
        raise DataError(f"{name} has no text column",
                        f"its columns are {', '.join(features) or 'none'}; minigpt needs a "
                        "column of strings")
    return strings[0]


def load(path: str, config: str | None, name: str, data_files: str | None = None) -> Any:
    """``datasets.load_dataset(path, config)`` with its failures turned into DataErrors.

    With no route to the Hub, the call runs in offline mode, so that ``datasets`` answers
    from its local cache at once instead of retrying for about 25 s. The mode is switched
    for this call only and put back afterwards; the environment is left alone.
    """
    try:
        import datasets
    except ImportError as e:
        raise DataError("the 'datasets' package is needed for Hugging Face datasets",
                        "pip install datasets, or use a local text file") from e
    try:
        # a local file needs no network: datasets' own builders read it
        with _offline(data_files is not None or (not datasets.config.HF_HUB_OFFLINE
                                                 and not _hub_reachable())):
            if data_files is None:
                dsd = datasets.load_dataset(path, config)
            else:
                dsd = _quietly(datasets, lambda: datasets.load_dataset(path,
                                                                       data_files=data_files))
    except Exception as e:
        if data_files is not None:
            if path == "json":
                _check_json_lines(data_files)
            raise DataError(f"cannot read {name}: {_cause(e)}",
                            "a JSON Lines file holds one JSON object per line, each with a "
                            "string field such as 'text'" if path == "json" else
                            "a Parquet file with a column of strings such as 'text'") from e
        raise _classify(e, name) from e
    if not hasattr(dsd, "keys"):
        dsd = {"train": dsd}
    if not len(dsd):
        raise DataError(f"{name} has no splits")
    return dsd


def _quietly(datasets: Any, load_it: Any) -> Any:
    """``load_it()`` without the progress bars and log lines of ``datasets``: a local file
    is read in a moment, and what goes wrong is raised, to be said once."""
    bars = not datasets.utils.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        return load_it()
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _cause(e: BaseException) -> str:
    """The first line of the error under ``datasets``' own wrapper (the parser's)."""
    while type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_json_lines(path: str) -> None:
    """A DataError naming the first line of a JSON Lines file that is not a JSON object."""
    from pathlib import Path

    from minigpt_cli.data.chat import json_lines

    for where, obj in json_lines(Path(path)):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: not a JSON object", "one JSON object per line")


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Hugging Face's offline mode (``HF_HUB_OFFLINE``) for the duration of the block."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    modules = (datasets.config, huggingface_hub.constants)
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.HF_HUB_OFFLINE = value


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (a quick offline check)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout).close()
        return True
    except OSError:
        return False


def _classify(e: Exception, name: str) -> DataError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    kinds = {c.__name__ for c in type(e).__mro__}
    offline = (isinstance(e, (ConnectionError, TimeoutError))
               or kinds & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
                           "ConnectTimeout", "TimeoutException", "NetworkError"}
               or "Couldn't reach" in text)
    if offline:
        return DataError(f"cannot download {name} (no network and not in the local "
                         "Hugging Face cache)", OFFLINE_HINT)
    if kinds & {"DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"}:
        return DataError(f"Hugging Face dataset {name} not found: {text}",
                         "check the name on huggingface.co/datasets, or use a local file")
    if isinstance(e, ValueError) and "config" in text.lower():
        return DataError(f"bad config for {name}: {text}",
                         "write hf:NAME:CONFIG with one of the dataset's configs")
    return DataError(f"cannot load {name}: {type(e).__name__}: {text}",
                     "check the dataset name and config, or use a local text file")

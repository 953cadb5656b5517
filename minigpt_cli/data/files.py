"""Where training text comes from, and the on-disk token cache.

:func:`resolve_source` turns ``data.dataset`` into a :class:`DataSource` whose splits are
named ``train``, ``val`` and (when the data has one) ``test``. Accepted forms, checked in
this order:

* ``hf:NAME[:CONFIG]`` - a Hugging Face dataset with a text column (see
  :mod:`minigpt_cli.hub`); ``wikitext-2`` and ``wikitext-103`` are shortcuts for
  ``Salesforce/wikitext`` (raw configs).
* ``stdlib-docs`` - the built-in corpus of standard-library docstrings
  (:mod:`minigpt_cli.corpus`). Built-in names win over a same-named local file; write
  ``./stdlib-docs`` for the file.
* a text file - the last ``val_fraction`` of its bytes, cut just after the first newline at
  or past that point (before it when there is none), is validation; the rest is training.
* a folder with ``train.txt``/``valid.txt``/``val.txt``/``validation.txt``/``test.txt`` or
  WikiText's ``wiki.{train,valid,test}.{tokens,raw}``. Without a validation file, the train
  file is split by position as for a single file.

Text files must be UTF-8 (a leading byte-order mark is skipped). Empty files, files with
NUL bytes in their first 4 MiB and files that do not decode are a :class:`DataError`;
invalid UTF-8 further in is reported when the text is read.

:func:`token_cache` encodes a split once per tokenizer and keeps the ids in
``<cache>/tokens/<key>.bin`` (raw uint16/uint32) with ``<key>.json`` metadata.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_write

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
CHUNK_BYTES = 2 << 20  # text chunks are about this size, cut at a newline
MAX_CHUNK_BYTES = 8 << 20  # a line longer than this is cut mid-line
CHECK_BYTES = 4 << 20  # bytes of each file validated up front
BOM = codecs.BOM_UTF8
ACCEPTED = ("a text file, a folder with train/valid/test text files, wikitext-2, "
            "wikitext-103, tinyshakespeare, hf:NAME[:CONFIG] or stdlib-docs")
OFFLINE_HINT = ("check the network, or use a local text file or folder, or the built-in "
                "stdlib-docs corpus")
FOLDER_FILES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "val": ("valid.txt", "val.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}
TOKEN_CACHE_VERSION = 1


class DataSource(ABC):
    """Text split into named parts. ``name`` is for display."""

    name: str

    @abstractmethod
    def splits(self) -> list[str]:
        """Available split names, canonical ones first."""

    @abstractmethod
    def iter_text(self, split: str) -> Iterator[str]:
        """The split's text in chunks of about 1-4 MB, ending at line boundaries."""

    @abstractmethod
    def fingerprint(self, split: str) -> str:
        """A hash of the split's content, for caches."""

    def size_hint(self, split: str) -> int:
        """UTF-8 bytes of the split's text, or 0 when unknown."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "splits": self.splits()}

    def check_split(self, split: str) -> str:
        """The canonical name of ``split``; a :class:`DataError` when there is none."""
        canonical = SPLIT_ALIASES.get(split, split)
        if canonical not in self.splits():
            raise DataError(f"{self.name} has no '{split}' split",
                            f"available splits: {', '.join(self.splits())}")
        return canonical


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of a file."""

    path: Path
    start: int
    end: int


class FileSource(DataSource):
    """Splits made of byte ranges of UTF-8 text files."""

    def __init__(self, name: str, parts: dict[str, list[Segment]], kind: str = "file"):
        self.name = name
        self.kind = kind
        self._parts = parts
        self._fingerprints: dict[str, str] = {}

    def splits(self) -> list[str]:
        return list(self._parts)

    def size_hint(self, split: str) -> int:
        return sum(s.end - s.start for s in self._parts[self.check_split(split)])

    def iter_text(self, split: str) -> Iterator[str]:
        return _iter_segments(self._parts[self.check_split(split)])

    def fingerprint(self, split: str) -> str:
        split = self.check_split(split)
        if split not in self._fingerprints:
            h = hashlib.sha256(b"minigpt-text-v1")
            for seg in self._parts[split]:
                for block in _read_range(seg, 1 << 20):
                    h.update(block)
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "splits": {
            split: {"bytes": self.size_hint(split),
                    "files": sorted({str(s.path) for s in segs})}
            for split, segs in self._parts.items()}}


def resolve_source(dataset: str, val_fraction: float = 0.1, *,
                   cache_dir: Path | None = None) -> DataSource:
    """Turn ``data.dataset`` into a :class:`DataSource` (forms in the module docstring).

    ``cache_dir`` is only used by ``stdlib-docs`` (default: :func:`default_cache_dir`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    spec = dataset.strip()
    if not spec:
        raise DataError("no dataset given", f"use {ACCEPTED}")
    if spec in ("wikitext-2", "wikitext-103") or spec.startswith("hf:"):
        from minigpt_cli import hub

        if spec.startswith("hf:"):
            path, _, config = spec[3:].partition(":")
            if not path.strip():
                raise DataError(f"'{spec}' names no dataset", "write hf:NAME or hf:NAME:CONFIG")
            return hub.HubSource(path.strip(), config.strip() or None, val_fraction, spec)
        return hub.HubSource("Salesforce/wikitext", f"{spec}-raw-v1", val_fraction, spec)
    if spec == "stdlib-docs":
        return _stdlib_docs(val_fraction, cache_dir)
    if spec == "tinyshakespeare":
        path = _download(TINYSHAKESPEARE_URL, "tinyshakespeare.txt", cache_dir)
        return FileSource(spec, _split_by_position(
            Segment(path, check_text_file(path), path.stat().st_size), val_fraction))
    path = Path(spec).expanduser()
    if path.is_file():
        start = check_text_file(path)
        return FileSource(spec, _split_by_position(Segment(path, start, path.stat().st_size),
                                                   val_fraction))
    if path.is_dir():
        return _folder_source(spec, path, val_fraction)
    if path.exists():
        raise DataError(f"{spec} is neither a file nor a folder", f"use {ACCEPTED}")
    looks_like_path = os.sep in spec or "/" in spec or "." in Path(spec).name
    what = "file or folder not found" if looks_like_path else "unknown dataset"
    raise DataError(f"{what}: {spec}", f"use {ACCEPTED}")


TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")


def _download(url: str, name: str, cache_dir: Path | None) -> Path:
    """A file from ``url``, fetched once into the cache (``downloads/``) and reused."""
    folder = Path(cache_dir or default_cache_dir()) / "downloads"
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
                        "with no network, pass the file itself: --dataset path/to/input.txt"
                        ) from e
    atomic_write(path, data)
    return path


def check_text_file(path: Path) -> int:
    """Validate the start of a text file; return the offset of its text (3 after a BOM)."""
    try:
        with open(path, "rb") as f:
            head = f.read(CHECK_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    start = 3 if head.startswith(BOM) else 0
    if not head[start:]:
        raise DataError(f"{path} is empty", "point data.dataset at a file with text in it")
    if b"\0" in head:
        raise DataError(f"{path} is binary (it contains NUL bytes), not text",
                        "minigpt reads UTF-8 text files")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head[start:], final=False)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {start + e.start})",
                        "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from e
    return start


def _folder_source(spec: str, folder: Path, val_fraction: float) -> FileSource:
    found: dict[str, Path] = {}
    for split, names in FOLDER_FILES.items():
        for fname in names:
            if (folder / fname).is_file():
                found[split] = folder / fname
                break
    if "train" not in found:
        raise DataError(f"{folder} has no training text file",
                        "name it train.txt (or wiki.train.tokens), with valid.txt and "
                        "test.txt beside it if you have them")
    parts: dict[str, list[Segment]] = {}
    for split, path in found.items():
        start = check_text_file(path)
        parts[split] = [Segment(path, start, path.stat().st_size)]
    if "val" not in found:
        parts.update(_split_by_position(parts["train"][0], val_fraction))
    return FileSource(spec, {s: parts[s] for s in SPLITS if s in parts}, kind="folder")


def _stdlib_docs(val_fraction: float, cache_dir: Path | None) -> FileSource:
    from minigpt_cli import corpus

    text_path, index, _ = corpus.load_or_extract(Path(cache_dir or default_cache_dir()))
    parts = {split: [Segment(text_path, a, b) for a, b in ranges]
             for split, ranges in corpus.split_ranges(index, val_fraction).items()}
    return FileSource(corpus.NAME, parts, kind="corpus")


def _split_by_position(seg: Segment, val_fraction: float) -> dict[str, list[Segment]]:
    """Train and val segments: val is the last ``val_fraction``, cut at a line boundary."""
    target = seg.start + int((seg.end - seg.start) * (1.0 - val_fraction))
    cut = _find_cut(seg, target)
    return {"train": [Segment(seg.path, seg.start, cut)],
            "val": [Segment(seg.path, cut, seg.end)]}


def _find_cut(seg: Segment, target: int, block: int = 1 << 16) -> int:
    with open(seg.path, "rb") as f:
        pos = target  # forward: just after the first newline at or past the target
        while pos < seg.end:
            f.seek(pos)
            data = f.read(min(block, seg.end - pos))
            i = data.find(b"\n")
            if i >= 0:
                if pos + i + 1 < seg.end:
                    return pos + i + 1
                break
            pos += len(data)
        end = target  # backward: just after the last newline before the target
        while end > seg.start:
            lo = max(seg.start, end - block)
            f.seek(lo)
            i = f.read(end - lo).rfind(b"\n")
            if i >= 0:
                return lo + i + 1
            end = lo
        f.seek(target)  # one long line: cut at the next UTF-8 character start
        tail = f.read(4)
    skip = 0
    while skip < len(tail) and 0x80 <= tail[skip] < 0xC0:
        skip += 1
    return min(target + skip, seg.end)


def _read_range(seg: Segment, block: int) -> Iterator[bytes]:
    with open(seg.path, "rb") as f:
        f.seek(seg.start)
        remaining = seg.end - seg.start
        while remaining > 0:
            data = f.read(min(block, remaining))
            if not data:
                raise DataError(f"{seg.path} got shorter while it was being read",
                                "do not change the data while minigpt runs")
            remaining -= len(data)
            yield data


def _iter_segments(segments: list[Segment]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf = bytearray()

    def decode(data: bytes, path: Path, final: bool = False) -> str:
        try:
            return decoder.decode(data, final=final)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text",
                            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from e

    path = segments[0].path if segments else Path()
    for seg in segments:
        path = seg.path
        for data in _read_range(seg, CHUNK_BYTES):
            buf += data
            if len(buf) < CHUNK_BYTES:
                continue
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) < MAX_CHUNK_BYTES:
                    continue
                cut = len(buf)
            text = decode(bytes(buf[:cut]), path)
            del buf[:cut]
            if text:
                yield text
    text = decode(bytes(buf), path, final=True)
    if text:
        yield text


def default_cache_dir() -> Path:
    """``$MINIGPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/minigpt``, else ``~/.cache/minigpt``."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "minigpt"
    return Path.home() / ".cache" / "minigpt"


@dataclass
class TokenArray:
    """A split's token ids (a read-only memmap) and statistics of its text.

    ``num_bytes`` counts UTF-8 bytes, ``num_words`` whitespace-separated words and
    ``num_lines`` newlines plus one for a last line without a newline.
    """

    tokens: np.ndarray
    num_tokens: int
    num_bytes: int
    num_words: int
    num_lines: int
    path: Path
    reused: bool = False  # True when the cache already held this split

    def __len__(self) -> int:
        return self.num_tokens


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def token_cache(source: DataSource, split: str, tokenizer: Any,
                cache_dir: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> TokenArray:
    """Token ids of ``split`` under ``tokenizer``, encoded once and cached on disk.

    The entry is keyed by the split's content fingerprint, the split name and the
    tokenizer's fingerprint. ``progress(bytes_done, bytes_total)`` is called while
    encoding (``bytes_total`` is 0 when unknown); nothing is called on a cache hit.
    """
    split = source.check_split(split)
    folder = Path(cache_dir or default_cache_dir()) / "tokens"
    tok_fp = tokenizer.fingerprint()
    src_fp = source.fingerprint(split)
    key = hashlib.sha256(
        f"minigpt-tokens-v{TOKEN_CACHE_VERSION}\0{src_fp}\0{split}\0{tok_fp}".encode()
    ).hexdigest()[:32]
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    dtype = token_dtype(int(tokenizer.vocab_size))
    cached = _load_entry(bin_path, meta_path, dtype)
    if cached is not None:
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{key}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"cannot write the token cache in {folder}: {e.strerror or e}",
                        "set MINIGPT_CACHE_DIR to a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            stats = _encode_into(f, source.iter_text(split), tokenizer, dtype,
                                 source.size_hint(split), progress)
            f.flush()
            os.fsync(f.fileno())
        if stats["num_tokens"] == 0:
            raise DataError(f"the {split} split of {source.name} is empty (0 tokens)",
                            "give it some text")
        os.replace(tmp, bin_path)
        meta = {"version": TOKEN_CACHE_VERSION, "dtype": dtype.name, **stats,
                "source": source.name, "split": split, "source_fingerprint": src_fp,
                "tokenizer_spec": getattr(tokenizer, "spec", ""),
                "tokenizer_fingerprint": tok_fp}
        atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write the token cache in {folder}: {e.strerror or e}",
                        "set MINIGPT_CACHE_DIR to a writable folder with free space") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    entry = _load_entry(bin_path, meta_path, dtype)
    assert entry is not None, f"token cache entry {bin_path} unreadable right after writing"
    entry.reused = False
    return entry


def check_length(arr: TokenArray, seq_len: int, split: str) -> None:
    """A :class:`DataError` unless ``arr`` holds at least one window of ``seq_len + 1``."""
    if arr.num_tokens < seq_len + 1:
        raise DataError(
            f"the {split} split has {arr.num_tokens} tokens, fewer than one context window "
            f"of {seq_len + 1}",
            "use a smaller model.max_seq_length (--set model.max_seq_length=N) or more data")


def _encode_into(f: Any, chunks: Iterator[str], tokenizer: Any, dtype: np.dtype,
                 total: int, progress: Callable[[int, int], None] | None) -> dict[str, int]:
    """Encode ``chunks`` into the open file ``f``; return the text statistics."""
    batch_encode = getattr(tokenizer, "encode_batch", None)
    group_size = 4 if callable(batch_encode) else 1
    n_tokens = n_bytes = n_words = n_lines = 0
    last_char = ""
    pending: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        encoded = batch_encode(pending) if group_size > 1 else [tokenizer.encode(pending[0])]
        for ids in encoded:
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            n_tokens += len(arr)
        pending.clear()
        if progress is not None:
            progress(n_bytes, max(total, n_bytes) if total else 0)

    if progress is not None:
        progress(0, total)
    for chunk in chunks:
        if not chunk:
            continue
        n_bytes += len(chunk.encode("utf-8"))
        n_lines += chunk.count("\n")
        n_words += len(chunk.split())
        if last_char and not last_char.isspace() and not chunk[0].isspace():
            n_words -= 1  # a word cut by the chunk boundary was counted twice
        last_char = chunk[-1]
        pending.append(chunk)
        if len(pending) >= group_size:
            flush()
    if pending:
        flush()
    if last_char and last_char != "\n":
        n_lines += 1
    return {"num_tokens": n_tokens, "num_bytes": n_bytes, "num_words": n_words,
            "num_lines": n_lines}


def _load_entry(bin_path: Path, meta_path: Path, dtype: np.dtype) -> TokenArray | None:
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["num_tokens"])
        if (meta.get("version") != TOKEN_CACHE_VERSION or meta["dtype"] != dtype.name
                or n <= 0 or bin_path.stat().st_size != n * dtype.itemsize):
            return None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
        return TokenArray(tokens=tokens, num_tokens=n, num_bytes=int(meta["num_bytes"]),
                          num_words=int(meta["num_words"]), num_lines=int(meta["num_lines"]),
                          path=bin_path, reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None

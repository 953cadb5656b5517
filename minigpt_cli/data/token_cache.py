"""The on-disk token cache: each split encoded once per tokenizer, then memory-mapped.

Entries live in ``<cache>/tokens/<key>.bin`` (raw uint16/uint32 ids) with ``<key>.json``
metadata, keyed by the split's content fingerprint, the split name and the tokenizer's
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt_cli import paths
from minigpt_cli.data.source import DataSource
from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_open, atomic_write

TOKEN_CACHE_VERSION = 1


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
    folder = Path(cache_dir or paths.cache_dir()) / "tokens"
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
        with atomic_open(bin_path) as f:
            stats = _encode_into(f, source.iter_text(split), tokenizer, dtype,
                                 source.size_hint(split), progress)
            if stats["num_tokens"] == 0:
                raise DataError(f"the {split} split of {source.name} is empty (0 tokens)",
                                "give it some text")
        meta = {"version": TOKEN_CACHE_VERSION, "dtype": dtype.name, **stats,
                "source": source.name, "split": split, "source_fingerprint": src_fp,
                "tokenizer_spec": getattr(tokenizer, "spec", ""),
                "tokenizer_fingerprint": tok_fp}
        atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write the token cache in {folder}: {e.strerror or e}",
                        "set MINIGPT_CACHE_DIR to a writable folder with free space") from e
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
            "use a smaller model.max_seq_length or more data")


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

"""The on-disk token cache: each split encoded once per tokenizer, then memory-mapped.

Entries live in ``<cache>/tokens/<key>.bin`` (raw uint16/uint32 ids) with ``<key>.json``
metadata, keyed by the split's content fingerprint, the split name and the tokenizer's
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt_cli import paths
from minigpt_cli.data.source import DataSource
from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_open, atomic_write
from minigpt_cli.spaces import ascii_white_space, has_wide_space

TOKEN_CACHE_VERSION = 2  # 2: chunks cut only where the ids do not change


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


ENCODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # pieces encoded at once
IN_FLIGHT = 2 * ENCODE_THREADS  # pieces (about 2 MB each) encoding or waiting to be written
MAX_CARRY = 8 << 20  # text held back while looking for a safe cut, before cutting anyway


def safe_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The text of ``chunks`` again, cut only after a newline between two characters that
    are not whitespace (``"word\\nWord"``).

    Byte-level BPE splits text into pieces with a pattern before merging. A run of
    whitespace is one piece or several depending on what follows it (``"\\n\\n"`` is
    one token of GPT-2, ``"  \\n"`` before a letter is two), so text cut at any newline
    encodes differently from the whole; no pattern of GPT-2, cl100k or o200k joins across
    such a cut, and SentencePiece encodes line by line. Encoding the pieces one by one, in
    any number of threads, gives exactly the ids of the text in one piece. Text with no such
    newline in ``MAX_CARRY`` characters is cut at its last newline, or where it ends.
    """
    carry = ""
    it = iter(chunks)
    following = next(it, None)
    while following is not None:
        chunk, following = following, next(it, None)
        text = carry + chunk if carry else chunk
        if following is None:  # the end: nothing to cut
            yield text
            return
        cut = _last_safe_cut(text)
        if cut == 0 and len(text) >= MAX_CARRY:
            cut = text.rfind("\n") + 1 or len(text)
        if cut:
            yield text[:cut]
        carry = text[cut:]


def _last_safe_cut(text: str) -> int:
    """The end of the last ``"\\n"`` in ``text`` with a non-space on both sides; 0: none."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i <= 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1


def _count_words(text: str, data: bytes) -> int:
    """``len(text.split())`` without the list: counted on the UTF-8 bytes ``data``."""
    if not data:
        return 0
    array = np.frombuffer(data, dtype=np.uint8)
    if has_wide_space(array):
        return len(text.split())
    space = ascii_white_space(array) | ((array - 28) < 4)  # and str.split's 28-31
    return int(np.count_nonzero(space[:-1] & ~space[1:])) + (not space[0])


def _encode_into(f: Any, chunks: Iterator[str], tokenizer: Any, dtype: np.dtype,
                 total: int, progress: Callable[[int, int], None] | None) -> dict[str, int]:
    """Encode ``chunks`` into the open file ``f``; return the text statistics.

    The text is re-cut at safe boundaries (``safe_pieces``), so the ids are those of the
    text in one piece. Each piece goes to a pool of threads, one per CPU, that encodes it
    with the tokenizer's ``encode_arrays`` (tiktoken and SentencePiece release the GIL
    while they encode) and counts its bytes, words and lines; this thread reads the text
    and writes the ids of the oldest piece, in order.
    """
    encode_arrays = getattr(tokenizer, "encode_arrays", None)

    def encode(text: str) -> tuple[np.ndarray, int, int, int]:
        ids = encode_arrays([text])[0] if callable(encode_arrays) else tokenizer.encode(text)
        data = text.encode("utf-8")
        return (np.asarray(ids).astype(dtype, copy=False), len(data), text.count("\n"),
                _count_words(text, data))

    n_tokens = n_bytes = n_words = n_lines = 0
    last_char = ""
    in_flight: deque = deque()  # futures of the pieces' ids and counts

    def write_oldest() -> None:
        nonlocal n_tokens, n_bytes, n_words, n_lines
        ids, size, lines, words = in_flight.popleft().result()
        f.write(ids.tobytes())
        n_tokens += len(ids)
        n_bytes += size
        n_lines += lines
        n_words += words
        if progress is not None:
            progress(n_bytes, max(total, n_bytes) if total else 0)

    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=ENCODE_THREADS,
                            thread_name_prefix="minigpt-encode") as pool:
        try:
            for piece in safe_pieces(c for c in chunks if c):
                in_flight.append(pool.submit(encode, piece))
                if last_char and not last_char.isspace() and not piece[0].isspace():
                    n_words -= 1  # a word cut by the boundary is counted in both pieces
                last_char = piece[-1]
                if len(in_flight) > IN_FLIGHT:
                    write_oldest()
            while in_flight:
                write_oldest()
        finally:
            for future in in_flight:
                future.cancel()
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

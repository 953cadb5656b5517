"""What a dataset looks like to a tokenizer, for ``minigpt inspect data``.

Per split: bytes, tokens, words, lines and documents (blocks of text between blank lines),
the distribution of document or line lengths in tokens, and the most frequent tokens.
Totals and token frequencies come from the token cache (the same ids training sees);
lengths come from encoding each document or line on its own, over at most
``LENGTH_SAMPLE_BYTES`` of each split. Conversations are counted as training renders
them (the chat token cache: a template's special tokens are one id each), with lengths per
conversation. No printing here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from minigpt_cli.data.chat import CONV_START, ChatSource, chat_token_cache
from minigpt_cli.data.source import DataSource
from minigpt_cli.data.token_cache import token_cache

UNITS = ("document", "line")
CHAT_UNIT = "conversation"  # the unit of a chat source's lengths, whatever was asked
LENGTH_SAMPLE_BYTES = 64 << 20  # lengths are measured over at most this much of a split
MAX_UNIT_CHARS = 1 << 20  # a longer document or line is encoded in pieces of this size
ENCODE_BATCH_CHARS = 1 << 20  # text handed to the tokenizer at once
COUNT_BLOCK = 1 << 24  # tokens per bincount
_SEPARATORS = {"document": re.compile(r"\n(?:[ \t\r\f\v]*\n)+"), "line": re.compile(r"\n")}

Progress = Callable[[str, int, int], None]  # (stage, bytes done, bytes total)


@dataclass
class Lengths:
    """Tokens per document (or per non-blank line), in text order."""

    unit: str
    tokens: np.ndarray  # one entry per measured document or line, in text order
    count: int  # documents or lines in the whole split; more than measured when sampled
    measured_bytes: int  # UTF-8 bytes of the measured documents or lines

    @property
    def sampled(self) -> bool:
        return len(self.tokens) < self.count

    def histogram(self) -> list[tuple[int, int, int]]:
        """``(lo, hi, count)`` of lengths in ``[lo, hi]``, in powers of two: 1, 2-3, 4-7, ...

        From the shortest length's bin to the longest's; bins between may be empty.
        """
        if not len(self.tokens):
            return []
        exponents = np.floor(np.log2(np.maximum(self.tokens, 1))).astype(np.int64)
        counts = np.bincount(exponents)
        first = int(exponents.min())
        return [(2 ** e, 2 ** (e + 1) - 1, int(counts[e])) for e in range(first, len(counts))]

    def to_dict(self) -> dict[str, Any]:
        t = self.tokens
        stats = ({"mean": float(t.mean()), "median": float(np.median(t)),
                  "p90": float(np.percentile(t, 90)), "min": int(t.min()), "max": int(t.max())}
                 if len(t) else dict.fromkeys(("mean", "median", "p90", "min", "max")))
        return {"unit": self.unit, "count": self.count, "measured": int(len(t)),
                "measured_tokens": int(t.sum()), "measured_bytes": self.measured_bytes,
                "sampled": self.sampled, **stats,
                "histogram": [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in self.histogram()]}


@dataclass
class SplitStats:
    split: str
    bytes: int
    tokens: int
    words: int
    lines: int
    documents: int
    lengths: Lengths
    top_tokens: list[tuple[int, int]]  # (id, count), most frequent first

    def to_dict(self, decode: Callable[[int], str]) -> dict[str, Any]:
        return {
            "bytes": self.bytes, "tokens": self.tokens, "words": self.words,
            "lines": self.lines, "documents": self.documents,
            "bytes_per_token": self.bytes / self.tokens if self.tokens else None,
            "lengths": self.lengths.to_dict(),
            "top_tokens": [{"id": i, "token": decode(i), "count": c,
                            "share": c / self.tokens} for i, c in self.top_tokens],
        }


def split_units(chunks: Iterable[str], unit: str) -> Iterator[str]:
    """The non-blank documents (blocks between blank lines) or lines of streamed text; one
    longer than ``MAX_UNIT_CHARS`` comes in pieces (see :func:`unit_pieces`)."""
    return (text for text, _ in unit_pieces(chunks, unit))


def unit_pieces(chunks: Iterable[str], unit: str) -> Iterator[tuple[str, bool]]:
    """``(text, continued)``: the non-blank documents or lines of streamed text, those
    longer than ``MAX_UNIT_CHARS`` cut into pieces; ``continued`` is True for every piece
    but a unit's first."""
    sep = _SEPARATORS[unit]
    pending, continued = "", False
    for chunk in chunks:
        parts = sep.split(pending + chunk)
        pending = parts.pop()  # may continue in the next chunk
        for part in parts:
            if part.strip() or continued:
                yield part, continued
            continued = False
        while len(pending) > MAX_UNIT_CHARS:  # cut before spaces: a separator stays whole
            cut = len(pending[:MAX_UNIT_CHARS].rstrip()) or MAX_UNIT_CHARS
            yield pending[:cut], continued
            pending, continued = pending[cut:], True
    if pending.strip() or (continued and pending):
        yield pending, continued


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id occurs in ``tokens`` (counted in blocks: memmaps stay on disk)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), COUNT_BLOCK):
        block = np.bincount(np.asarray(tokens[start:start + COUNT_BLOCK]), minlength=vocab_size)
        counts += block[:vocab_size]
    return counts


def most_frequent(tokens: np.ndarray, vocab_size: int, top: int) -> list[tuple[int, int]]:
    """The ``top`` most frequent ids of ``tokens`` with their counts (ties: lower id first)."""
    counts = token_counts(tokens, vocab_size)
    order = np.argsort(-counts, kind="stable")[:max(top, 0)]
    return [(int(i), int(counts[i])) for i in order if counts[i] > 0]


def measure_lengths(source: DataSource, split: str, tokenizer: Any, unit: str,
                    progress: Progress | None = None,
                    limit_bytes: int = LENGTH_SAMPLE_BYTES) -> Lengths:
    """Token lengths of the split's documents or lines, each encoded on its own (a long
    one in pieces of ``MAX_UNIT_CHARS``, their lengths added up).

    Every document or line is counted; lengths are measured until ``limit_bytes`` of them.
    """
    assert unit in UNITS, unit
    encode_batch = getattr(tokenizer, "encode_batch", None) or (
        lambda texts: [tokenizer.encode(t) for t in texts])
    total_bytes = source.size_hint(split)
    lengths: list[int] = []
    batch: list[str] = []
    continues: list[bool] = []  # of each text in the batch: it is not a unit's first piece
    batch_chars = measured = count = 0
    measuring = True  # the current unit is measured (it started within limit_bytes)

    def flush() -> None:
        nonlocal batch_chars
        for ids, more in zip(encode_batch(batch), continues, strict=True):
            if more:
                lengths[-1] += len(ids)
            else:
                lengths.append(len(ids))
        batch.clear()
        continues.clear()
        batch_chars = 0
        if progress is not None:
            progress(f"measuring {split}", measured, max(total_bytes, measured))

    for text, more in unit_pieces(source.iter_text(split), unit):
        if not more:
            count += 1
            measuring = measured < limit_bytes
        if not measuring:
            continue
        batch.append(text)
        continues.append(more)
        batch_chars += len(text)
        measured += len(text.encode("utf-8", errors="surrogatepass"))
        if batch_chars >= ENCODE_BATCH_CHARS:
            flush()
    if batch:
        flush()
    return Lengths(unit, np.asarray(lengths, dtype=np.int64), count, measured)


def split_stats(source: DataSource, split: str, tokenizer: Any, unit: str = "document",
                top: int = 10, progress: Progress | None = None,
                limit_bytes: int = LENGTH_SAMPLE_BYTES) -> SplitStats:
    """Everything ``inspect data`` shows about one split (for conversations with their
    template set, see :func:`chat_split_stats`)."""
    split = source.check_split(split)
    if isinstance(source, ChatSource) and source.template is not None:
        return chat_split_stats(source, split, tokenizer, top)
    on_tokens = None if progress is None else (
        lambda done, total: progress(f"tokenizing {split}", done, total))
    arr = token_cache(source, split, tokenizer, progress=on_tokens)
    top_tokens = most_frequent(arr.tokens, int(tokenizer.vocab_size), top)
    lengths = measure_lengths(source, split, tokenizer, unit, progress, limit_bytes)
    documents = lengths.count if unit == "document" else sum(
        not more for _, more in unit_pieces(source.iter_text(split), "document"))
    return SplitStats(split, arr.num_bytes, arr.num_tokens, arr.num_words, arr.num_lines,
                      documents, lengths, top_tokens)


def chat_split_stats(source: ChatSource, split: str, tokenizer: Any,
                     top: int = 10) -> SplitStats:
    """One split of conversations as training sees it: the ids and top tokens of the chat
    token cache, a length per conversation; bytes, words and lines of the template's text
    without its special tokens."""
    template = source.template
    chat = chat_token_cache(source, split, tokenizer, template)
    top_tokens = most_frequent(chat.tokens, int(tokenizer.vocab_size), top)
    starts = np.flatnonzero(np.asarray(chat.flags) & CONV_START)
    lengths = np.diff(np.append(starts, chat.num_tokens)).astype(np.int64)
    n_bytes = words = lines = 0
    for conv in source.conversations(split):
        text = "".join(p.text for p in template.pieces(conv) if not p.special)
        n_bytes += len(text.encode("utf-8", errors="surrogatepass"))
        words += len(text.split())
        lines += text.count("\n") + (bool(text) and not text.endswith("\n"))
    return SplitStats(split, n_bytes, chat.num_tokens, words, lines, len(lengths),
                      Lengths(CHAT_UNIT, lengths, len(lengths), n_bytes), top_tokens)

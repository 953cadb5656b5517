"""Control characters as extra special tokens, where tiktoken must encode parts on their own.

tiktoken encodes the text between two special tokens as a text of its own (its split
pattern's ``$`` and look-aheads see an end there) and never merges across one. A copy of an
encoding with ``MARKERS`` as special tokens can therefore cut one text into parts that are
encoded apart (:mod:`minigpt_tokenizers.split_free`) or encode a batch of texts in one call
(``JoinedBatch``), with the markers' ids dropped afterwards. Special-token text of the
encoding itself (``<|endoftext|>``) stays ordinary text, as in ``encode_ordinary``.
"""

from __future__ import annotations

import numpy as np

# Control characters that are not whitespace: a text lacks at least one of them.
MARKERS = tuple(chr(c) for c in (*range(0, 9), *range(14, 28)))


def with_markers(enc, pattern: str | None = None):
    """A copy of the tiktoken encoding ``enc`` (with split ``pattern``, by default its own)
    whose special tokens are the markers, and their ids (after every id of ``enc``)."""
    import tiktoken

    top = max([*enc._mergeable_ranks.values(), *enc._special_tokens.values()])
    ids = {m: top + 1 + i for i, m in enumerate(MARKERS)}
    marked = tiktoken.Encoding(f"{enc.name}-marked", pat_str=pattern or enc._pat_str,
                               mergeable_ranks=enc._mergeable_ranks, special_tokens=ids)
    return marked, ids


def absent_marker(text: str) -> str | None:
    """The first marker that ``text`` does not hold; None if it holds them all."""
    return next((m for m in MARKERS if m not in text), None)


class JoinedBatch:
    """``encode_ordinary`` of many texts in one tiktoken call: they are joined with a
    marker and the ids are cut apart where its id is."""

    def __init__(self, enc):
        self.marked, self.ids = with_markers(enc)

    def encode(self, texts: list[str]) -> list[np.ndarray] | None:
        """Each text's ids; None when the texts hold every marker between them."""
        for marker in MARKERS:
            joined = marker.join(texts)
            if joined.count(marker) == len(texts) - 1:
                break
        else:
            return None
        ids = self.marked.encode_to_numpy(joined, allowed_special={marker},
                                          disallowed_special=())
        parts = np.split(ids, np.flatnonzero(ids == self.ids[marker]))
        return parts[:1] + [part[1:] for part in parts[1:]]

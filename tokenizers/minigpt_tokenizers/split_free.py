"""GPT-2's byte-level BPE without the look-ahead in its split pattern, for large texts.

GPT-2's pattern (r50k, p50k) ends in ``\\s+(?!\\S)``: a run of whitespace before a
non-space leaves its last character to the next piece (``"  word"`` splits as ``" "``,
``" word"``). That one look-ahead sends all of tiktoken's splitting through fancy_regex's
backtracking machine, about 60% of its encoding time. The same pattern without it
(``LOOKAHEAD_FREE``) runs on the regex crate's automata: tiktoken encodes about 1.7x
faster on one thread, and threads scale better.

The two patterns split a text differently only at a run of two or more whitespace
characters followed by a non-space: GPT-2's ends a piece before the run's last character,
the other takes the whole run. So the text is cut there first. A marker character, one of
the look-ahead-free encoding's special tokens, goes in at each such place; tiktoken splits
the text between markers on its own and the markers' ids are dropped. Between two markers
both patterns give the same pieces: every run of whitespace there is either one character
before a non-space (``\\s`` alone, or a space that ``" ?X+"`` takes along, in both) or the
end of a part (``\\s++$`` in GPT-2's, ``\\s+`` in the other), and the other alternatives
are the same but for possessive quantifiers, which change nothing where nothing follows
them. The ids are therefore exactly those of ``encode_ordinary``; tests check it on real
and adversarial text.
"""

from __future__ import annotations

import re

import numpy as np

from minigpt_cli.spaces import ascii_white_space, has_wide_space

LOOKAHEAD_FREE = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""

# Control characters that are not whitespace: a text lacks at least one of them.
MARKERS = tuple(chr(c) for c in (*range(0, 9), *range(14, 28)))
# Unicode White_Space, the regex crate's \s
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_BEFORE_LAST_OF_RUN = re.compile(f"[{_SPACE}](?=[{_SPACE}][^{_SPACE}])")


class SplitFreeEncoder:
    """``encode_ordinary`` of a tiktoken encoding with GPT-2's split pattern (the caller
    checks that it has), as a NumPy array, faster."""

    def __init__(self, enc):
        import tiktoken

        top = max([*enc._mergeable_ranks.values(), *enc._special_tokens.values()])
        self.marker_ids = {m: top + 1 + i for i, m in enumerate(MARKERS)}
        self.fast = tiktoken.Encoding(f"{enc.name}-lookahead-free", pat_str=LOOKAHEAD_FREE,
                                      mergeable_ranks=enc._mergeable_ranks,
                                      special_tokens=self.marker_ids)

    def encode(self, text: str) -> np.ndarray | None:
        """The ids as uint32; None for the rare text holding every marker character."""
        marker = next((m for m in MARKERS if m not in text), None)
        if marker is None:
            return None
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if has_wide_space(data):
            marked = _BEFORE_LAST_OF_RUN.sub(lambda m: m.group() + marker, text)
            cut = len(marked) != len(text)
        else:  # ASCII whitespace only: find the places on the bytes
            space = ascii_white_space(data)
            places = np.flatnonzero(space[:-2] & space[1:-1] & ~space[2:]) + 1
            cut = len(places) > 0
            marked = (np.insert(data, places, ord(marker)).tobytes().decode("utf-8")
                      if cut else text)
        ids = self.fast.encode_to_numpy(marked, allowed_special={marker},
                                        disallowed_special=())
        return ids[ids != self.marker_ids[marker]] if cut else ids

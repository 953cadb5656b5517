"""tiktoken's byte-level BPE without the look-ahead in its split patterns, for large texts.

The split patterns of GPT-2 (r50k, p50k), cl100k and o200k all hold ``\\s+(?!\\S)``: a run
of spaces before a non-space leaves its last character to the next piece (``"  word"``
splits as ``" "``, ``" word"``). That one look-ahead sends all of tiktoken's splitting
through fancy_regex's backtracking machine, about 60% of its encoding time. The same
pattern with ``\\s+`` in its place runs on the regex crate's automata: tiktoken encodes
about 1.7x faster on one thread, and threads scale better.

The two split a text differently only where a run of spaces before a non-space ends in
two characters that the pattern treats alike: the original ends a piece before the last
one, the other takes both. (GPT-2's treats every space alike. cl100k's and o200k's first
end a piece at the run's last ``\\r`` or ``\\n``, in both versions, so only what follows
it counts.) So the text is cut there first: a marker character, one of the look-ahead-free
encoding's special tokens, goes in before the run's last character, tiktoken splits the
text between markers on its own, and the markers' ids are dropped. For cl100k and o200k a
marker also goes after the run's last newline, because cl100k's ``\\s++$`` takes a run that
ends at a marker whole, as if the text ended there.

Between two markers both patterns then give the same pieces: a run there is either one
character before a non-space (taken alone or with the non-space, alike in both), or the
end of a part (``\\s++$`` or ``\\s+(?!\\S)`` in the original, ``\\s+`` or ``\\s+$`` in
the other), or a run that ends in a newline before a non-space (the same alternative in
both); the other alternatives are the same but for possessive quantifiers, which change
nothing where nothing they could give back follows them. The ids are therefore exactly
those of ``encode_ordinary``; tests check it on real and adversarial text.
"""

from __future__ import annotations

import re

import numpy as np

from minigpt_cli.spaces import ascii_white_space, has_wide_space
from minigpt_tokenizers.markers import absent_marker, with_markers

# Unicode White_Space, the regex crate's \s
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_OTHER = _SPACE.replace("\n", "").replace("\r", "")
# where markers go in a text with spaces beyond ASCII: right after each match
_PLACES = {
    False: re.compile(f"[{_SPACE}](?=[{_SPACE}][^{_SPACE}])"),
    True: re.compile(f"[\r\n](?=[{_OTHER}]{{2,}}[^{_SPACE}])|[{_OTHER}](?=[{_OTHER}][^{_SPACE}])"),
}


def _places(data: np.ndarray, newlines_apart: bool) -> np.ndarray:
    """Where markers go in the UTF-8 bytes ``data`` of a text whose spaces are all ASCII:
    before the last character of every run of spaces that a non-space follows and whose
    last two characters the pattern treats alike (with ``newlines_apart``: neither is a
    newline); with ``newlines_apart``, also after such a run's last newline, if it has one,
    since cl100k's ``\\s++$`` would otherwise take the marker for the end of the text."""
    space = ascii_white_space(data)
    alike = space & (data != 10) & (data != 13) if newlines_apart else space
    last = np.flatnonzero(alike[:-2] & alike[1:-1] & ~space[2:]) + 1
    if not newlines_apart or not len(last):
        return last
    starts = np.flatnonzero(alike & ~np.concatenate([[False], alike[:-1]]))
    first = starts[np.searchsorted(starts, last, side="right") - 1]  # of the same run
    before = data[np.maximum(first - 1, 0)]
    after_newline = first[(first > 0) & ((before == 10) | (before == 13))]
    return np.union1d(last, after_newline)


class SplitFreeEncoder:
    """``encode_ordinary`` of the tiktoken encoding ``enc``, as a NumPy array, faster.

    ``pattern`` is ``enc``'s split pattern without its look-ahead, and ``newlines_apart``
    says whether it ends a piece at a run's last ``\\r`` or ``\\n`` (cl100k, o200k) or not
    (GPT-2); the caller, which knows the patterns, vouches for both.
    """

    def __init__(self, enc, pattern: str, newlines_apart: bool):
        self.fast, self.marker_ids = with_markers(enc, pattern)
        self.newlines_apart = newlines_apart

    def encode(self, text: str) -> np.ndarray | None:
        """The ids as uint32; None for the rare text holding every marker character."""
        marker = absent_marker(text)
        if marker is None:
            return None
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if has_wide_space(data):
            marked = _PLACES[self.newlines_apart].sub(lambda m: m.group() + marker, text)
            cut = len(marked) != len(text)
        else:  # ASCII spaces only: find the places on the bytes
            places = _places(data, self.newlines_apart)
            cut = len(places) > 0
            marked = (np.insert(data, places, ord(marker)).tobytes().decode("utf-8")
                      if cut else text)
        ids = self.fast.encode_to_numpy(marked, allowed_special={marker},
                                        disallowed_special=())
        return ids[ids != self.marker_ids[marker]] if cut else ids

"""Unicode whitespace found on UTF-8 bytes agrees with Python's own idea of it."""

from __future__ import annotations

import numpy as np

from minigpt_cli.spaces import ascii_white_space, has_wide_space


def test_white_space_found_on_the_bytes():
    for code in [*range(0x80, 0x800), *range(0x800, 0x4000, 7), 0x205F, 0x3000, 0x3001]:
        char = chr(code)
        for text in (char, "a" + char, char + "b", "é" + char + "–"):
            data = np.frombuffer(text.encode(), dtype=np.uint8)
            assert has_wide_space(data) == char.isspace(), hex(code)
    assert not has_wide_space(np.zeros(0, dtype=np.uint8))
    data = np.arange(128, dtype=np.uint8)
    assert np.flatnonzero(ascii_white_space(data)).tolist() == [9, 10, 11, 12, 13, 32]

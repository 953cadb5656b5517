"""The tokenizer tests' toy BPE: tiktoken encodings over a few hundred ranks, with each
split pattern minigpt knows, and random text made to stress the patterns."""

from __future__ import annotations

import random

import pytest

from minigpt_tokenizers.markers import MARKERS
from minigpt_tokenizers.tiktoken_bpe import (
    CL100K_PAT,
    O200K_PAT,
    R50K_PAT,
    R50K_PAT_OLD,
    TiktokenTokenizer,
)

WIDE = "\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
# what the random texts are made of: every kind of whitespace, apostrophes for the
# contractions, digits, letters of several scripts, marks, emoji, the marker characters
ALPHABET = (" " * 12 + "\n" * 6 + "\t\r\x0b\x0c" + WIDE + "\x1c\x1f" + "'" * 4
            + "stldmrve" * 2 + "abcxyzTHE" + "0123456789" + ".,;!?-_()@" + "éßжяЖ中文ع"
            + "\u0301\u0308" + "😀🇫" + "".join(MARKERS[:4]))
WORDS = ["the", " the", "he", " he", "ll", "'s", "'ll", " a", "  ", "   ", "    ", "\n\n",
         " \n", "\n ", "\t\t", "ab", "abc", " x", "12", "123", "..", "é", " \n\n", "\r\n",
         "\n  ", ".\n", "!\n\n"]


def _toy_ranks() -> dict[bytes, int]:
    """A byte-level BPE with merges for spaces, newlines, contractions and a few words."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in WORDS:
        data = word.encode()
        for end in range(2, len(data) + 1):  # every prefix, so each merge has its parts
            ranks.setdefault(data[:end], len(ranks))
    return ranks


PATTERNS = {"r50k": R50K_PAT, "r50k-old": R50K_PAT_OLD, "cl100k": CL100K_PAT,
            "o200k": O200K_PAT}


@pytest.fixture(scope="module", params=list(PATTERNS))
def toy(request) -> TiktokenTokenizer:
    """The toy BPE under each split pattern in turn."""
    return TiktokenTokenizer.from_ranks("tiktoken:toy", "toy", _toy_ranks(),
                                        PATTERNS[request.param])


@pytest.fixture
def toy_ranks() -> dict[bytes, int]:
    return _toy_ranks()


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, 80))) for _ in range(n)]


@pytest.fixture
def random_texts():
    """``random_texts(n, seed=0)``: n texts of 0-80 characters drawn from ``ALPHABET``."""
    return _random_texts

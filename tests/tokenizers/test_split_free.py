"""tiktoken's BPE without its split patterns' look-ahead gives exactly tiktoken's ids, for
GPT-2's, cl100k's and o200k's patterns: on random text full of runs of spaces and
newlines, on every kind of Unicode space, and on real corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from minigpt_tokenizers.split_free import MARKERS, SplitFreeEncoder
from minigpt_tokenizers.tiktoken_bpe import (
    CL100K_PAT,
    LOOKAHEAD_FREE,
    O200K_PAT,
    R50K_PAT,
    R50K_PAT_OLD,
    TiktokenTokenizer,
)

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
WIDE = "\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
# what the random texts are made of: every kind of whitespace, apostrophes for the
# contractions, digits, letters of several scripts, marks, emoji, the marker characters
ALPHABET = (" " * 12 + "\n" * 6 + "\t\r\x0b\x0c" + WIDE + "\x1c\x1f" + "'" * 4
            + "stldmrve" * 2 + "abcxyzTHE" + "0123456789" + ".,;!?-_()@" + "éßжяЖ中文ع"
            + "\u0301\u0308" + "😀🇫" + "".join(MARKERS[:4]))
WORDS = ["the", " the", "he", " he", "ll", "'s", "'ll", " a", "  ", "   ", "    ", "\n\n",
         " \n", "\n ", "\t\t", "ab", "abc", " x", "12", "123", "..", "é", " \n\n", "\r\n",
         "\n  ", ".\n", "!\n\n"]


def toy_ranks() -> dict[bytes, int]:
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
    return TiktokenTokenizer.from_ranks("tiktoken:toy", "toy", toy_ranks(),
                                        PATTERNS[request.param])


def split_free(tok: TiktokenTokenizer) -> SplitFreeEncoder:
    return SplitFreeEncoder(tok.enc, *LOOKAHEAD_FREE[tok.enc._pat_str])


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, 80))) for _ in range(n)]


def test_random_text_encodes_as_tiktoken_does(toy):
    fast = split_free(toy)
    texts = random_texts(3000)
    for text in texts:
        assert fast.encode(text).tolist() == toy.enc.encode_ordinary(text), repr(text)
    joined = "".join(texts)  # one long text, on both of the ways to find the cuts
    ascii_spaced = "".join(c for c in joined if c not in WIDE)
    for text in (joined, ascii_spaced):
        assert fast.encode(text).tolist() == toy.enc.encode_ordinary(text)


@pytest.mark.parametrize("text", [
    "", " ", "  ", "a  b", "a \n b", "a\n\nb", "a \t\nb", "  'sa", " 's", "a  's", "x  \n",
    "end  ", "\n\n\n", "a\u00a0\u00a0b", "a \u3000b", "\u2003 x", "a  \u00a0", "é  é",
    "a\n  b", "a\n \n  b", "a\r\n\t b", "!\n\n  x", "a \n\n", "a\n  ", "a\n\u00a0 b", "a  1",
    "a \x0b\n  b", "a\x0b\x0cb",
])
def test_the_places_where_the_patterns_differ(toy, text):
    assert split_free(toy).encode(text).tolist() == toy.enc.encode_ordinary(text)


def test_a_text_holding_every_marker_goes_the_usual_way(toy):
    text = "a  b" + "".join(MARKERS) + "  c"
    assert split_free(toy).encode(text) is None
    assert toy.encode_arrays([text])[0].tolist() == toy.enc.encode_ordinary(text)


def test_encode_arrays_uses_it_for_known_patterns_only(toy):
    texts = random_texts(50, seed=1)
    assert toy._split_free_encoder() is not None
    other = TiktokenTokenizer.from_ranks("tiktoken:toy-other", "toy-other", toy_ranks(),
                                         r"""\p{L}+|\s+(?!\S)|\s+|.""")
    assert other._split_free_encoder() is None
    for tok in (toy, other):
        got = [ids.tolist() for ids in tok.encode_arrays(texts)]
        assert got == [tok.enc.encode_ordinary(t) for t in texts]


def test_gpt2_on_real_corpora():
    ranks = SHARED / "tokenizers" / "gpt2.tiktoken"
    corpora = [SHARED / "data" / "wikitext-2" / "test.txt",
               SHARED / "data" / "tinyshakespeare" / "input.txt"]
    if not all(p.is_file() for p in (ranks, *corpora)):
        pytest.skip(f"shared test data not found under {SHARED} (set MINIGPT_SHARED_DIR)")
    tok = TiktokenTokenizer.create(str(ranks))
    fast = split_free(tok)
    texts = [p.read_text(encoding="utf-8") for p in corpora] + random_texts(300, seed=2)
    for text in texts:
        assert np.array_equal(fast.encode(text), tok.enc.encode_ordinary(text))

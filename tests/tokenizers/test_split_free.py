"""tiktoken's BPE without its split patterns' look-ahead gives exactly tiktoken's ids, for
GPT-2's, cl100k's and o200k's patterns: on random text full of runs of spaces and
newlines, on every kind of Unicode space, and on real corpora."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from minigpt_tokenizers.markers import MARKERS
from minigpt_tokenizers.split_free import SplitFreeEncoder
from minigpt_tokenizers.tiktoken_bpe import LOOKAHEAD_FREE, TiktokenTokenizer

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")


def split_free(tok: TiktokenTokenizer) -> SplitFreeEncoder:
    return SplitFreeEncoder(tok.enc, *LOOKAHEAD_FREE[tok.enc._pat_str])


def test_random_text_encodes_as_tiktoken_does(toy, random_texts):
    fast = split_free(toy)
    texts = random_texts(3000)
    for text in texts:
        assert fast.encode(text).tolist() == toy.enc.encode_ordinary(text), repr(text)
    joined = "".join(texts)  # one long text, on both of the ways to find the cuts
    ascii_spaced = "".join(c for c in joined if not (c.isspace() and ord(c) > 127))
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


def test_encode_arrays_uses_it_for_known_patterns_only(toy, toy_ranks, random_texts):
    texts = random_texts(50, seed=1)
    assert toy._split_free_encoder() is not None
    other = TiktokenTokenizer.from_ranks("tiktoken:toy-other", "toy-other", toy_ranks,
                                         r"""\p{L}+|\s+(?!\S)|\s+|.""")
    assert other._split_free_encoder() is None
    for tok in (toy, other):
        got = [ids.tolist() for ids in tok.encode_arrays(texts)]
        assert got == [tok.enc.encode_ordinary(t) for t in texts]


def test_gpt2_on_real_corpora(random_texts):
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

"""Building the token cache in parallel gives exactly the ids of one single-threaded
encode of the whole text: GPT-2's BPE (tiktoken) and SentencePiece, on real corpora."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import minigpt_tokenizers as mt
from minigpt_cli.data import files, token_cache
from minigpt_cli.data.resolve import resolve_source

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
# whitespace that a cut at any newline would encode differently, with GPT-2 and others
TRICKY = ("a\n\nb  \nc \n d\n\n\n e\t\nf\r\ng.\nh'\ns\n" * 40 + "x\u00a0y\u3000z \u2003w\n"
          + "end without newline  ")


def shared_text(rel: str) -> str:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared test data not found: {path} (set MINIGPT_SHARED_DIR)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2():
    shared_text("tokenizers/gpt2.tiktoken")
    return mt.create(f"tiktoken:{SHARED / 'tokenizers' / 'gpt2.tiktoken'}")


@pytest.fixture(scope="module")
def text() -> str:
    wiki = shared_text("data/wikitext-2/test.txt")
    return wiki[:300_000] + TRICKY + shared_text("data/tinyshakespeare/input.txt")[:200_000]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of about 4 KB (so hundreds of cuts), at most 16 KB held back."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(files, "MAX_CHUNK_BYTES", 16384)
    monkeypatch.setattr(token_cache, "MAX_CARRY", 16384)


def build(tmp_path: Path, text: str, tok) -> token_cache.TokenArray:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    src = resolve_source(str(path), 0.1)
    train = "".join(src.iter_text("train"))
    arr = token_cache.token_cache(src, "train", tok, tmp_path / "cache")
    return arr, train


def test_gpt2_ids_are_those_of_one_encode(tmp_path, gpt2, text, small_chunks):
    arr, train = build(tmp_path, text, gpt2)
    want = gpt2.enc.encode_ordinary(train)  # one call, one thread
    assert np.array_equal(np.asarray(arr.tokens), want)
    assert (arr.num_bytes, arr.num_words, arr.num_lines) == (
        len(train.encode()), len(train.split()), train.count("\n") + (not train.endswith("\n")))


def test_cutting_at_any_newline_would_change_the_ids(gpt2):
    """What the safe cuts avoid: "\\n\\n" ending a text is one GPT-2 token, inside it two."""
    assert gpt2.encode("a\n\nb") != gpt2.encode("a\n\n") + gpt2.encode("b")
    pieces = list(token_cache.safe_pieces(["a\n\n", "b\nc\n", "d"]))
    assert pieces == ["a\n\nb\n", "c\nd"]
    assert sum((gpt2.encode(p) for p in pieces), []) == gpt2.encode("a\n\nb\nc\nd")


def test_sentencepiece_ids_are_those_of_one_encode(tmp_path, text, small_chunks):
    tok = mt.create("sentencepiece:bpe:800", lambda: iter([text[:150_000]]))
    arr, train = build(tmp_path, text, tok)
    assert np.array_equal(np.asarray(arr.tokens), tok.encode(train))


@pytest.mark.parametrize("sample", [
    "", " ", "a", "a b", " a  b ", "x\u00a0y", "x\u3000y\u2003", "\x1c a\x1fb\x85c",
    "\x1c a\x1fb\x1d\x1ec é",
    "naïve café ünïcode", TRICKY,
])
def test_words_are_counted_as_str_split_does(sample):
    assert token_cache._count_words(sample, sample.encode()) == len(sample.split())


def test_safe_pieces_keep_the_text_and_cut_only_between_words():
    chunks = ["one\ntwo  \n", "\nthree\n\nfour\n", "five\n six", "\nseven"]
    pieces = list(token_cache.safe_pieces(chunks))
    assert "".join(pieces) == "".join(chunks)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.endswith("\n") and not a[-2].isspace() and not b[0].isspace()

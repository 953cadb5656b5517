"""The token cache: built once per source, split and tokenizer, with the text's statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minigpt_cli.data import files
from minigpt_cli.data import token_cache as token_cache_module
from minigpt_cli.data.resolve import DataError, resolve_source
from minigpt_cli.data.token_cache import check_length, token_cache


class Counting:
    """Wraps a tokenizer, counts encode calls and can pretend to a larger vocabulary."""

    def __init__(self, inner, vocab_size=None):
        self.inner = inner
        self.calls = 0
        self.vocab_size = vocab_size or inner.vocab_size
        self.eot_id = inner.eot_id
        self.spec = inner.spec + (f"+vocab{vocab_size}" if vocab_size else "")

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def fingerprint(self):
        return f"{self.inner.fingerprint()}-{self.vocab_size}"


class Batching(Counting):
    def encode_batch(self, texts):
        self.calls += 1
        return [self.inner.encode(t) for t in texts]


def expected_stats(text):
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return len(text.encode()), len(text.split()), lines


def test_token_cache_reuse_stats_and_dtype(tmp_path, byte_tok, joined):
    path = tmp_path / "t.txt"
    text = "".join(f"To be, or not {i} to be:\tthat is the question.\n" for i in range(400))
    text += "no newline at the end"
    path.write_text(text)
    src = resolve_source(str(path), 0.1)
    tok = Counting(byte_tok)
    calls = []
    first = token_cache(src, "train", tok, tmp_path / "cache",
                        progress=lambda d, t: calls.append((d, t)))
    assert tok.calls >= 1 and not first.reused
    train_text = joined(src, "train")
    assert first.tokens.dtype == np.uint16
    assert (first.num_bytes, first.num_words, first.num_lines) == expected_stats(train_text)
    assert first.num_tokens == len(tok.inner.encode(train_text)) == len(first.tokens)
    assert np.array_equal(np.asarray(first.tokens), tok.inner.encode(train_text))
    assert not first.tokens.flags.writeable
    assert calls[-1] == (first.num_bytes, first.num_bytes)
    assert first.path.parent == tmp_path / "cache" / "tokens"

    before = tok.calls
    second = token_cache(src, "train", tok, tmp_path / "cache")
    assert tok.calls == before and second.reused
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))

    val = token_cache(src, "val", tok, tmp_path / "cache")
    val_text = joined(src, "val")
    assert (val.num_bytes, val.num_words, val.num_lines) == expected_stats(val_text)
    assert val.path != first.path

    big = token_cache(src, "train", Counting(byte_tok, vocab_size=70_000),
                      tmp_path / "cache")
    assert big.tokens.dtype == np.uint32 and big.path != first.path
    assert np.array_equal(np.asarray(big.tokens), np.asarray(first.tokens))
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))


def test_token_cache_batches_and_counts_words_across_chunks(tmp_path, monkeypatch, byte_tok,
                                                            joined):
    monkeypatch.setattr(files, "CHUNK_BYTES", 64)
    monkeypatch.setattr(files, "MAX_CHUNK_BYTES", 128)
    path = tmp_path / "t.txt"
    text = "short line\n" + "x" * 1000 + " tail words here\n" + "end\n" * 50
    path.write_text(text)
    src = resolve_source(str(path), 0.1)
    tok = Batching(byte_tok)
    arr = token_cache(src, "train", tok, tmp_path / "c")
    train_text = joined(src, "train")
    assert (arr.num_bytes, arr.num_words, arr.num_lines) == expected_stats(train_text)
    assert 1 <= tok.calls < len(list(src.iter_text("train")))  # grouped
    assert np.array_equal(np.asarray(arr.tokens), tok.inner.encode(train_text))


def test_token_cache_stdlib_docs(corpus_cache, byte_tok):
    src = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    arr = token_cache(src, "val", byte_tok, corpus_cache)
    assert arr.num_tokens >= arr.num_bytes > 20_000


def test_token_cache_invalid_entry_is_rebuilt(tmp_path, byte_tok):
    path = tmp_path / "t.txt"
    path.write_text("abc\n" * 100)
    src = resolve_source(str(path))
    tok = Counting(byte_tok)
    arr = token_cache(src, "train", tok, tmp_path)
    arr.path.with_suffix(".json").write_text("{broken")
    again = token_cache(src, "train", tok, tmp_path)
    assert tok.calls == 2 and again.num_tokens == arr.num_tokens and not again.reused


def test_bad_utf8_late_in_file_fails_while_reading(tmp_path, byte_tok):
    path = tmp_path / "late.txt"
    path.write_bytes(b"ok line\n" * (files.CHECK_BYTES // 8 + 10) + b"\xff\xfe bad\n" * 10)
    src = resolve_source(str(path), 0.5)
    with pytest.raises(DataError, match="not UTF-8"):
        token_cache(src, "val", byte_tok, tmp_path / "c")
    assert not list((tmp_path / "c" / "tokens").glob("*"))


def test_empty_split_and_unwritable_cache(tmp_path, byte_tok):
    path = tmp_path / "one.txt"
    path.write_text("a single line without newline")
    src = files.FileSource("x", {"train": [files.Segment(path, 0, 5)],
                                "val": [files.Segment(path, 5, 5)]})
    with pytest.raises(DataError, match="empty"):
        token_cache(src, "val", byte_tok, tmp_path / "c")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write the token cache") as e:
        token_cache(src, "train", byte_tok, blocker / "cache")
    assert "MINIGPT_CACHE_DIR" in e.value.hint


def test_check_length():
    arr = token_cache_module.TokenArray(tokens=np.zeros(100, np.uint16), num_tokens=100,
                                        num_bytes=100, num_words=10, num_lines=1,
                                        path=Path("x.bin"))
    check_length(arr, 99, "val")
    with pytest.raises(DataError, match="the val split has 100 tokens, fewer than one "
                                        "context window of 101") as e:
        check_length(arr, 100, "val")
    assert "max_seq_length" in e.value.hint

"""Tests for minigpt_cli.data: sources, splits, the stdlib-docs corpus and the token cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import minigpt_tokenizers
from minigpt_cli import paths
from minigpt_cli.data import corpus, files
from minigpt_cli.data import token_cache as token_cache_module
from minigpt_cli.data.resolve import DataError, resolve_source
from minigpt_cli.data.token_cache import check_length, token_cache

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
WIKITEXT2 = SHARED / "data" / "wikitext-2"

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"{SHAKESPEARE} not available")
needs_wikitext = pytest.mark.skipif(not (WIKITEXT2 / "valid.txt").is_file(),
                                    reason=f"{WIKITEXT2} not available")


class _ByteFallback(minigpt_tokenizers.Tokenizer):
    """Used only until the real byte tokenizer plugin exists."""

    name = "byte"
    spec = "byte"
    vocab_size = 257
    eot_id = 256

    @classmethod
    def create(cls, arg, training_text=None):
        return cls()

    @classmethod
    def load(cls, directory, meta):
        return cls()

    def save_files(self, directory):
        return {}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_tokenizer():
    try:
        return minigpt_tokenizers.create("byte")
    except Exception:
        return _ByteFallback()


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


def joined(source, split):
    return "".join(source.iter_text(split))


def expected_stats(text):
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return len(text.encode()), len(text.split()), lines


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


# --- text files and folders ------------------------------------------------------------


@needs_shakespeare
def test_file_split_by_position_at_line_boundary():
    raw = SHAKESPEARE.read_bytes()
    src = resolve_source(str(SHAKESPEARE), 0.1)
    assert src.splits() == ["train", "val"]
    train, val = joined(src, "train"), joined(src, "val")
    assert (train + val).encode() == raw
    cut = len(train.encode())
    target = int(len(raw) * 0.9)
    assert target <= cut < target + 200
    assert raw[cut - 1:cut] == b"\n"
    assert src.size_hint("train") == cut and src.size_hint("val") == len(raw) - cut
    assert src.fingerprint("train") != src.fingerprint("val")
    assert src.describe()["splits"]["val"]["bytes"] == len(raw) - cut


def test_chunks_end_at_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)
    path = tmp_path / "t.txt"
    text = "".join(f"line {i} héllo wörld\n" for i in range(2000))
    path.write_text(text, encoding="utf-8")
    chunks = list(resolve_source(str(path)).iter_text("train"))
    assert len(chunks) > 5
    assert all(c.endswith("\n") for c in chunks)
    assert "".join(chunks) + joined(resolve_source(str(path)), "val") == text


def test_bom_is_skipped_and_single_line_file_splits(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "ééé".encode() * 100)  # one line, two-byte chars
    src = resolve_source(str(path), 0.5)
    train, val = joined(src, "train"), joined(src, "val")
    assert train + val == "ééé" * 100
    assert train and val


@needs_wikitext
def test_folder_with_train_valid_test(tmp_path):
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_bytes((WIKITEXT2 / "valid.txt").read_bytes())
    (folder / "wiki.valid.tokens").write_bytes((WIKITEXT2 / "test.txt").read_bytes()[:50000])
    (folder / "test.txt").write_text("the test split\n")
    src = resolve_source(str(folder))
    assert src.splits() == ["train", "val", "test"]
    assert joined(src, "train").encode() == (WIKITEXT2 / "valid.txt").read_bytes()
    assert joined(src, "validation") == joined(src, "val")  # alias
    assert joined(src, "test") == "the test split\n"


@needs_wikitext
def test_folder_with_only_train_is_split(tmp_path):
    folder = tmp_path / "only"
    folder.mkdir()
    raw = (WIKITEXT2 / "valid.txt").read_bytes()
    (folder / "train.txt").write_bytes(raw)
    src = resolve_source(str(folder), 0.2)
    assert src.splits() == ["train", "val"]
    assert (joined(src, "train") + joined(src, "val")).encode() == raw
    assert joined(src, "train").endswith("\n")


# --- stdlib-docs -----------------------------------------------------------------------


def test_stdlib_docs_corpus(corpus_cache):
    src = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    assert src.name == "stdlib-docs" and src.splits() == ["train", "val"]
    train, val = joined(src, "train"), joined(src, "val")
    assert len(train) > 500_000 and len(val) > 20_000
    assert len(val) < len(train) / 3
    assert "\n\n" in train and "\x00" not in train
    # deterministic: a second resolve (from the cache) gives identical text
    again = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    assert again.fingerprint("train") == src.fingerprint("train")
    assert again.fingerprint("val") == src.fingerprint("val")
    assert list((corpus_cache / "corpus").glob("stdlib-docs-*.json"))


def test_stdlib_docs_skips_tests_and_uses_ast():
    sources = corpus.source_files(corpus.stdlib_dir())
    rels = [f.relative_to(corpus.stdlib_dir()).parts for f in sources]
    assert rels and not any({"test", "tests", "idle_test", "site-packages"} & set(p[:-1])
                            for p in rels)
    assert [f.as_posix() for f in sources] == sorted(f.as_posix() for f in sources)
    import ast
    tree = ast.parse('"""Mod."""\nclass A:\n    """  Cls.\n      more"""\n'
                     '    def f(self):\n        """Fn."""\nif 1:\n    def g():\n        "G."\n')
    assert corpus.module_docstrings(tree) == ["Mod.", "Cls.\nmore", "Fn.", "G."]


# --- the token cache -------------------------------------------------------------------


def test_token_cache_reuse_stats_and_dtype(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(f"To be, or not {i} to be:\tthat is the question.\n" for i in range(400))
    text += "no newline at the end"
    path.write_text(text)
    src = resolve_source(str(path), 0.1)
    tok = Counting(byte_tokenizer())
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

    big = token_cache(src, "train", Counting(byte_tokenizer(), vocab_size=70_000),
                      tmp_path / "cache")
    assert big.tokens.dtype == np.uint32 and big.path != first.path
    assert np.array_equal(np.asarray(big.tokens), np.asarray(first.tokens))
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))


def test_token_cache_batches_and_counts_words_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 64)
    monkeypatch.setattr(files, "MAX_CHUNK_BYTES", 128)
    path = tmp_path / "t.txt"
    text = "short line\n" + "x" * 1000 + " tail words here\n" + "end\n" * 50
    path.write_text(text)
    src = resolve_source(str(path), 0.1)
    tok = Batching(byte_tokenizer())
    arr = token_cache(src, "train", tok, tmp_path / "c")
    train_text = joined(src, "train")
    assert (arr.num_bytes, arr.num_words, arr.num_lines) == expected_stats(train_text)
    assert 1 <= tok.calls < len(list(src.iter_text("train")))  # grouped
    assert np.array_equal(np.asarray(arr.tokens), tok.inner.encode(train_text))


def test_token_cache_stdlib_docs(corpus_cache):
    src = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    arr = token_cache(src, "val", byte_tokenizer(), corpus_cache)
    assert arr.num_tokens >= arr.num_bytes > 20_000


def test_token_cache_invalid_entry_is_rebuilt(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc\n" * 100)
    src = resolve_source(str(path))
    tok = Counting(byte_tokenizer())
    arr = token_cache(src, "train", tok, tmp_path)
    arr.path.with_suffix(".json").write_text("{broken")
    again = token_cache(src, "train", tok, tmp_path)
    assert tok.calls == 2 and again.num_tokens == arr.num_tokens and not again.reused


# --- failures --------------------------------------------------------------------------


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        resolve_source(str(tmp_path / "nope.txt"))
    assert "stdlib-docs" in e.value.hint
    with pytest.raises(DataError, match="unknown dataset") as e:
        resolve_source("wikitext-7")
    assert "hf:NAME" in e.value.hint
    with pytest.raises(DataError):
        resolve_source("  ")
    with pytest.raises(DataError, match="names no dataset"):
        resolve_source("hf:")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\xef\xbb\xbf", "is empty"),
    (b"hello\x00world\n", "binary"),
    ("caf\u00e9 na\u00efve\n".encode("latin-1"), "not UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        resolve_source(str(path))
    assert str(path) in e.value.message and e.value.hint
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        resolve_source(str(folder))


def test_bad_utf8_late_in_file_fails_while_reading(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"ok line\n" * (files.CHECK_BYTES // 8 + 10) + b"\xff\xfe bad\n" * 10)
    src = resolve_source(str(path), 0.5)
    with pytest.raises(DataError, match="not UTF-8"):
        token_cache(src, "val", byte_tokenizer(), tmp_path / "c")
    assert not list((tmp_path / "c" / "tokens").glob("*"))


def test_folder_without_train_file(tmp_path):
    (tmp_path / "valid.txt").write_text("x\n")
    with pytest.raises(DataError, match="no training text file"):
        resolve_source(str(tmp_path))


def test_unknown_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello\nworld\n")
    src = resolve_source(str(path))
    with pytest.raises(DataError, match="no 'test' split") as e:
        list(src.iter_text("test"))
    assert "train, val" in e.value.hint
    with pytest.raises(DataError):
        token_cache(src, "bogus", byte_tokenizer(), tmp_path)


def test_empty_split_and_unwritable_cache(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line without newline")
    src = files.FileSource("x", {"train": [files.Segment(path, 0, 5)],
                                "val": [files.Segment(path, 5, 5)]})
    with pytest.raises(DataError, match="empty"):
        token_cache(src, "val", byte_tokenizer(), tmp_path / "c")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write the token cache") as e:
        token_cache(src, "train", byte_tokenizer(), blocker / "cache")
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


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "m"))
    assert paths.cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MINIGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert paths.cache_dir() == tmp_path / "x" / "minigpt"


# --- Hugging Face (no network: load_dataset is monkeypatched) --------------------------


def test_hf_offline_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what datasets 2.x-5.x raises with no network
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub "
                              "(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext-2", "wikitext-103", "hf:someone/corpus:cfg"):
        with pytest.raises(DataError, match="cannot download") as e:
            resolve_source(name)
        assert "\n" not in e.value.message
        assert "stdlib-docs" in e.value.hint and "local text file" in e.value.hint


def test_hf_offline_mode_is_set_for_the_call_only(monkeypatch):
    """With no route to the Hub, load_dataset runs in offline mode (its local cache answers
    at once); the mode is put back afterwards and the environment is left alone."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    from minigpt_cli.data import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    seen = []

    def load_dataset(path, config=None):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a\n"] * 9})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    resolve_source("hf:someone/corpus")
    assert seen == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)  # online: left as it is
    resolve_source("hf:someone/corpus")
    assert seen[-1] == (False, False)


def test_hf_not_found_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from datasets.exceptions import DatasetNotFoundError

    def missing(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="not found"):
        resolve_source("hf:nobody/nothing")


def test_hf_source_with_fake_dataset(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = [f"document {i} has words\nand a second line" for i in range(50)]
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": list(range(50)), "body": docs}),
        "test": datasets.Dataset.from_dict({"id": [1], "body": ["the test doc"]}),
    })
    seen = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, config=None: seen.append((path, config)) or fake)
    src = resolve_source("hf:me/docs:small", 0.1)
    assert seen == [("me/docs", "small")]
    assert src.splits() == ["train", "val", "test"]
    assert src.describe()["text_column"] == "body"
    assert joined(src, "train") == "".join(d + "\n" for d in docs[:45])
    assert joined(src, "val") == "".join(d + "\n" for d in docs[45:])
    assert src.size_hint("val") == len(joined(src, "val").encode())
    assert src.fingerprint("train") != src.fingerprint("val")
    arr = token_cache(src, "val", byte_tokenizer(), tmp_path)
    assert arr.num_lines == 10 and arr.num_bytes == len(joined(src, "val").encode())

    wiki = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": ["", " = T = \n", "", " a b \n"]})
        for split in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None: wiki)
    src = resolve_source("wikitext-2")
    assert src.splits() == ["train", "val", "test"]
    assert joined(src, "val") == "\n = T = \n\n a b \n"

    numbers = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None: numbers)
    with pytest.raises(DataError, match="no text column"):
        resolve_source("hf:me/numbers")


def test_tinyshakespeare_offline_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="cannot download tinyshakespeare") as e:
        resolve_source("tinyshakespeare", cache_dir=tmp_path)
    assert "pass the file itself" in e.value.hint


def test_tinyshakespeare_download_is_cached(tmp_path, monkeypatch):
    import io
    import urllib.request

    calls = []

    def fake(url, timeout=None):
        calls.append(url)
        return io.BytesIO(b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    for _ in range(2):
        source = resolve_source("tinyshakespeare", cache_dir=tmp_path)
        assert source.splits() == ["train", "val"]
    assert len(calls) == 1

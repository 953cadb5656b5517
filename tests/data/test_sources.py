"""Data sources: text files and folders, their splits, tinyshakespeare, and the errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from minigpt_cli.data import files
from minigpt_cli.data.resolve import DataError, resolve_source
from minigpt_cli.data.token_cache import token_cache

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
WIKITEXT2 = SHARED / "data" / "wikitext-2"

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"{SHAKESPEARE} not available")
needs_wikitext = pytest.mark.skipif(not (WIKITEXT2 / "valid.txt").is_file(),
                                    reason=f"{WIKITEXT2} not available")


@needs_shakespeare
def test_file_split_by_position_at_line_boundary(joined):
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


def test_chunks_end_at_newlines(tmp_path, monkeypatch, joined):
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)
    path = tmp_path / "t.txt"
    text = "".join(f"line {i} héllo wörld\n" for i in range(2000))
    path.write_text(text, encoding="utf-8")
    chunks = list(resolve_source(str(path)).iter_text("train"))
    assert len(chunks) > 5
    assert all(c.endswith("\n") for c in chunks)
    assert "".join(chunks) + joined(resolve_source(str(path)), "val") == text


def test_bom_is_skipped_and_single_line_file_splits(tmp_path, joined):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "ééé".encode() * 100)  # one line, two-byte chars
    src = resolve_source(str(path), 0.5)
    train, val = joined(src, "train"), joined(src, "val")
    assert train + val == "ééé" * 100
    assert train and val


@needs_wikitext
def test_folder_with_train_valid_test(tmp_path, joined):
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
def test_folder_with_only_train_is_split(tmp_path, joined):
    folder = tmp_path / "only"
    folder.mkdir()
    raw = (WIKITEXT2 / "valid.txt").read_bytes()
    (folder / "train.txt").write_bytes(raw)
    src = resolve_source(str(folder), 0.2)
    assert src.splits() == ["train", "val"]
    assert (joined(src, "train") + joined(src, "val")).encode() == raw
    assert joined(src, "train").endswith("\n")


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
    ("hello\n".encode("utf-16"), "UTF-16"),  # with its byte-order mark
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


def test_a_folder_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    import os

    (tmp_path / "train.txt").write_text("some text\n" * 10)

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", refused)  # as chmod 000 does for a user but root
    with pytest.raises(DataError, match=f"cannot read the folder {tmp_path}: Permission denied"):
        resolve_source(str(tmp_path))


def test_folder_without_train_file(tmp_path):
    (tmp_path / "valid.txt").write_text("x\n")
    with pytest.raises(DataError, match="no training text file"):
        resolve_source(str(tmp_path))


def test_unknown_split(tmp_path, byte_tok):
    path = tmp_path / "t.txt"
    path.write_text("hello\nworld\n")
    src = resolve_source(str(path))
    with pytest.raises(DataError, match="no 'test' split") as e:
        list(src.iter_text("test"))
    assert "train, val" in e.value.hint
    with pytest.raises(DataError):
        token_cache(src, "bogus", byte_tok, tmp_path)


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


@pytest.mark.parametrize("bad, message", [(b"\0", "binary (a NUL byte at offset {})"),
                                          (b"\xff", "not UTF-8 text (bad byte at offset {})")])
def test_a_bad_byte_past_the_checked_start_is_named_with_its_offset(tmp_path, bad, message):
    """check_text_file looks at the first 4 MiB; reading the rest checks it as well."""
    line = b"All the world's a stage, and all the men and women merely players.\n"
    head = line * ((files.CHECK_BYTES + 3 * files.CHUNK_BYTES) // len(line))
    path = tmp_path / "late.txt"
    path.write_bytes(head + b"They have their exits " + bad + b"and entrances.\n" + line * 10)
    src = resolve_source(str(path), 0.5)  # the bad byte is in val, past a few chunks
    assert "".join(src.iter_text("train"))
    with pytest.raises(DataError, match=re.escape(message.format(len(head) + 22))):
        for _ in src.iter_text("val"):
            pass

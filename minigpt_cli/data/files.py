"""Sources made of byte ranges of local UTF-8 text files: a file, a folder of split files,
the built-in corpus.

Text files must be UTF-8 (a leading byte-order mark is skipped). Empty files, files with
NUL bytes in their first 4 MiB and files that do not decode are a :class:`DataError`;
invalid UTF-8 further in is reported when the text is read.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt_cli.data.source import CHUNK_BYTES, MAX_CHUNK_BYTES, SPLITS, DataSource
from minigpt_cli.errors import DataError

CHECK_BYTES = 4 << 20  # bytes of each file validated up front
BOM = codecs.BOM_UTF8
FOLDER_FILES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "val": ("valid.txt", "val.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of a file."""

    path: Path
    start: int
    end: int


class FileSource(DataSource):
    """Splits made of byte ranges of UTF-8 text files."""

    def __init__(self, name: str, parts: dict[str, list[Segment]], kind: str = "file"):
        self.name = name
        self.kind = kind
        self._parts = parts
        self._fingerprints: dict[str, str] = {}

    def splits(self) -> list[str]:
        return list(self._parts)

    def size_hint(self, split: str) -> int:
        return sum(s.end - s.start for s in self._parts[self.check_split(split)])

    def iter_text(self, split: str) -> Iterator[str]:
        return _iter_segments(self._parts[self.check_split(split)])

    def fingerprint(self, split: str) -> str:
        split = self.check_split(split)
        if split not in self._fingerprints:
            h = hashlib.sha256(b"minigpt-text-v1")
            for seg in self._parts[split]:
                for block in _read_range(seg, 1 << 20):
                    h.update(block)
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "splits": {
            split: {"bytes": self.size_hint(split),
                    "files": sorted({str(s.path) for s in segs})}
            for split, segs in self._parts.items()}}


def check_text_file(path: Path) -> int:
    """Validate the start of a text file; return the offset of its text (3 after a BOM)."""
    try:
        with open(path, "rb") as f:
            head = f.read(CHECK_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    start = 3 if head.startswith(BOM) else 0
    if not head[start:]:
        raise DataError(f"{path} is empty", "point data.dataset at a file with text in it")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text, not UTF-8",
                        "convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8")
    if b"\0" in head:
        raise DataError(f"{path} is binary (it contains NUL bytes), not text",
                        "minigpt reads UTF-8 text files")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head[start:], final=False)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {start + e.start})",
                        "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from e
    return start


def folder_source(spec: str, folder: Path, val_fraction: float) -> FileSource:
    found: dict[str, Path] = {}
    for split, names in FOLDER_FILES.items():
        for fname in names:
            if (folder / fname).is_file():
                found[split] = folder / fname
                break
    if "train" not in found:
        raise DataError(f"{folder} has no training text file",
                        "name it train.txt (or wiki.train.tokens), with valid.txt and "
                        "test.txt beside it if you have them")
    parts: dict[str, list[Segment]] = {}
    for split, path in found.items():
        start = check_text_file(path)
        parts[split] = [Segment(path, start, path.stat().st_size)]
    if "val" not in found:
        parts.update(split_by_position(parts["train"][0], val_fraction))
    return FileSource(spec, {s: parts[s] for s in SPLITS if s in parts}, kind="folder")


def split_by_position(seg: Segment, val_fraction: float) -> dict[str, list[Segment]]:
    """Train and val segments: val is the last ``val_fraction``, cut at a line boundary."""
    target = seg.start + int((seg.end - seg.start) * (1.0 - val_fraction))
    cut = _find_cut(seg, target)
    return {"train": [Segment(seg.path, seg.start, cut)],
            "val": [Segment(seg.path, cut, seg.end)]}


def _find_cut(seg: Segment, target: int, block: int = 1 << 16) -> int:
    with open(seg.path, "rb") as f:
        pos = target  # forward: just after the first newline at or past the target
        while pos < seg.end:
            f.seek(pos)
            data = f.read(min(block, seg.end - pos))
            i = data.find(b"\n")
            if i >= 0:
                if pos + i + 1 < seg.end:
                    return pos + i + 1
                break
            pos += len(data)
        end = target  # backward: just after the last newline before the target
        while end > seg.start:
            lo = max(seg.start, end - block)
            f.seek(lo)
            i = f.read(end - lo).rfind(b"\n")
            if i >= 0:
                return lo + i + 1
            end = lo
        f.seek(target)  # one long line: cut at the next UTF-8 character start
        tail = f.read(4)
    skip = 0
    while skip < len(tail) and 0x80 <= tail[skip] < 0xC0:
        skip += 1
    return min(target + skip, seg.end)


def _read_range(seg: Segment, block: int) -> Iterator[bytes]:
    with open(seg.path, "rb") as f:
        f.seek(seg.start)
        remaining = seg.end - seg.start
        while remaining > 0:
            data = f.read(min(block, remaining))
            if not data:
                raise DataError(f"{seg.path} got shorter while it was being read",
                                "do not change the data while minigpt runs")
            remaining -= len(data)
            yield data


def _iter_segments(segments: list[Segment]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf = bytearray()
    marks: list[tuple[int, Path, int]] = []  # (position in buf, file, offset in it) of each read

    def where(pos: int) -> tuple[Path, int]:
        start, path, offset = next(m for m in reversed(marks) if m[0] <= pos)
        return path, offset + pos - start

    def decode(data: bytes, final: bool = False) -> str:
        """The start of ``buf`` as text, checked here too: ``check_text_file`` only looks at
        the start of a file."""
        nul = data.find(b"\0")
        if nul >= 0:
            path, offset = where(nul)
            raise DataError(f"{path} is binary (a NUL byte at offset {offset}), not text",
                            "minigpt reads UTF-8 text files")
        try:
            return decoder.decode(data, final=final)
        except UnicodeDecodeError as e:
            path, offset = where(e.start)
            raise DataError(f"{path} is not UTF-8 text (bad byte at offset {offset})",
                            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from e

    def consumed(cut: int) -> None:
        path, offset = where(cut)
        kept = [(pos - cut, p, o) for pos, p, o in marks if pos > cut]
        del buf[:cut]
        marks[:] = [(0, path, offset), *kept]

    for seg in segments:
        offset = seg.start
        for data in _read_range(seg, CHUNK_BYTES):
            marks.append((len(buf), seg.path, offset))
            offset += len(data)
            buf += data
            if len(buf) < CHUNK_BYTES:
                continue
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) < MAX_CHUNK_BYTES:
                    continue
                cut = len(buf)
            text = decode(bytes(buf[:cut]))
            consumed(cut)
            if text:
                yield text
    text = decode(bytes(buf), final=True)
    if text:
        yield text

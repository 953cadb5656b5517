"""What every data source is: text in named splits, streamed in chunks, fingerprinted.

Splits are named ``train``, ``val`` and (when the data has one) ``test``;
``validation``, ``valid`` and ``dev`` are read as ``val``. ``resolve.py`` turns a
``data.dataset`` setting into a source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from minigpt_cli.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
CHUNK_BYTES = 2 << 20  # text chunks are about this size, cut at a newline
MAX_CHUNK_BYTES = 8 << 20  # a line longer than this is cut mid-line


class DataSource(ABC):
    """Text split into named parts. ``name`` is for display."""

    name: str

    @abstractmethod
    def splits(self) -> list[str]:
        """Available split names, canonical ones first."""

    @abstractmethod
    def iter_text(self, split: str) -> Iterator[str]:
        """The split's text in chunks of about 1-4 MB, ending at line boundaries."""

    @abstractmethod
    def fingerprint(self, split: str) -> str:
        """A hash of the split's content, for caches."""

    def size_hint(self, split: str) -> int:
        """UTF-8 bytes of the split's text, or 0 when unknown."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "splits": self.splits()}

    def check_split(self, split: str) -> str:
        """The canonical name of ``split``; a :class:`DataError` when there is none."""
        canonical = SPLIT_ALIASES.get(split, split)
        if canonical not in self.splits():
            raise DataError(f"{self.name} has no '{split}' split",
                            f"available splits: {', '.join(self.splits())}")
        return canonical

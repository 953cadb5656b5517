"""The tokenizer plugin seam.

A tokenizer plugin is a class that subclasses :class:`Tokenizer` and is registered under
the entry-point group ``minigpt.tokenizers``. The built-in tokenizers register through the
same group, in this package's ``pyproject.toml``::

    [project.entry-points."minigpt.tokenizers"]
    byte = "minigpt_tokenizers.byte:ByteTokenizer"

A spec names a plugin and, after the first colon, an argument the plugin interprets:
``byte``, ``char``, ``tiktoken:gpt2``, ``tiktoken:path/to/ranks.tiktoken``,
``sentencepiece:unigram:8000``.

Special tokens (a chat template's ``<|im_start|>``, ``<|im_end|>``) are added to any
tokenizer with :meth:`Tokenizer.add_special_tokens`: they take the ids after the plugin's
own, are saved in ``tokenizer.json`` and restored by :func:`load`. Ordinary text never
encodes to them (a user typing ``<|im_end|>`` gets the ids of that text); a template puts
their ids in itself, and decoding renders them as their text.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path

from minigpt_cli.errors import TokenizerError  # raised by plugins too; re-exported here

__all__ = ["ENTRY_POINT_GROUP", "META_FILE", "MissingPluginError", "TextSource", "Tokenizer",
           "TokenizerError", "available", "create", "load", "parse_spec", "plugin_class"]

ENTRY_POINT_GROUP = "minigpt.tokenizers"
META_FILE = "tokenizer.json"

# Yields the training split's text in pieces; tokenizers that learn a vocabulary call it.
TextSource = Callable[[], Iterable[str]]


class Tokenizer(ABC):
    """What minigpt needs from a tokenizer.

    ``eot_id`` is the end-of-text token: it separates documents and stops generation.
    A plugin whose tokens can split a UTF-8 character may also define
    ``decode_bytes(ids) -> bytes``; streaming then shows each character once it is whole.
    """

    #: the plugin's entry-point name; set by each plugin class
    name: str = ""
    #: True when :meth:`create` needs the training text to learn a vocabulary
    needs_training: bool = False

    spec: str
    vocab_size: int  # the plugin's own tokens plus the added special tokens
    eot_id: int
    #: special tokens added with add_special_tokens, text -> id (never mutated in place)
    added_tokens: dict[str, int] = {}

    @classmethod
    @abstractmethod
    def create(cls, arg: str, training_text: TextSource | None = None) -> Tokenizer:
        """Build from the part of the spec after ``name:`` (empty when there is none)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, meta: dict) -> Tokenizer:
        """Rebuild from files :meth:`save` wrote; ``meta`` is the parsed ``tokenizer.json``."""

    @abstractmethod
    def save_files(self, directory: Path) -> dict:
        """Write the files needed to rebuild this tokenizer offline; return extra metadata."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to token ids; special-token text in the input is encoded as plain text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Token ids to text; incomplete UTF-8 sequences decode to U+FFFD."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts; plugins override this when they can do it in parallel."""
        return [self.encode(text) for text in texts]

    def encode_arrays(self, texts: list[str]) -> list:
        """``encode_batch`` as NumPy integer arrays, for encoding large corpora: plugins
        override it to skip building a Python int per token."""
        import numpy as np

        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Give each of ``tokens`` an id after the existing ones (a token already there
        keeps its id); return their ids in order. Plain text never encodes to them."""
        added = dict(self.added_tokens)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise TokenizerError(f"a special token must be non-empty text, got {token!r}")
            if token not in added:
                added[token] = self.vocab_size
                self.vocab_size += 1
        self.added_tokens = added
        return [added[t] for t in tokens]

    def special_id(self, token: str) -> int:
        """The id of an added special token (a TokenizerError when it was never added)."""
        try:
            return self.added_tokens[token]
        except KeyError:
            raise TokenizerError(f"the tokenizer has no special token {token!r}") from None

    def added_token_bytes(self, i: int) -> bytes | None:
        """The text of added special token ``i`` as UTF-8, or None when ``i`` is not one;
        plugins' ``decode`` uses it for ids past their own vocabulary."""
        if not self.added_tokens:
            return None
        table = getattr(self, "_added_by_id", None)
        if table is None or len(table) != len(self.added_tokens):
            table = self._added_by_id = {v: k.encode() for k, v in self.added_tokens.items()}
        return table.get(i)

    def save(self, directory: Path) -> None:
        """Write the tokenizer's files and ``tokenizer.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        extra = self.save_files(directory)
        meta = {"name": self.name, "spec": self.spec, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, **extra}
        if self.added_tokens:
            meta["added_tokens"] = dict(self.added_tokens)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def fingerprint(self) -> str:
        """A stable hash of everything that determines the token ids, for caches."""
        import tempfile

        h = hashlib.sha256(self.spec.encode())
        with tempfile.TemporaryDirectory() as tmp:
            self.save(Path(tmp))
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
        return h.hexdigest()[:16]


class MissingPluginError(TokenizerError):
    """Saved tokenizer files name a plugin that is not installed or cannot be imported."""


def available() -> dict[str, object]:
    """Registered plugins by name (entry points, not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def plugin_class(name: str) -> type[Tokenizer]:
    eps = available()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise TokenizerError(f"unknown tokenizer '{name}'", f"available: {known}")
    try:
        cls = eps[name].load()
    except Exception as e:  # the plugin's package is broken: ImportError, AttributeError, ...
        raise TokenizerError(f"tokenizer plugin '{name}' ({eps[name].value}) cannot be loaded: "
                             f"{type(e).__name__}: {e}",
                             "reinstall or fix the package that provides it") from e
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise TokenizerError(f"tokenizer plugin '{name}' does not provide a Tokenizer class")
    return cls


def parse_spec(spec: str) -> tuple[str, str]:
    name, _, arg = spec.strip().partition(":")
    if not name:
        raise TokenizerError("empty tokenizer spec", "try 'byte', 'char' or 'tiktoken:gpt2'")
    return name, arg


def create(spec: str, training_text: TextSource | None = None) -> Tokenizer:
    """Build a tokenizer from a spec such as ``tiktoken:gpt2``."""
    name, arg = parse_spec(spec)
    tok = plugin_class(name).create(arg, training_text)
    if tok.name != name:  # load() finds the plugin by the name saved in tokenizer.json
        tok.name = name
    return tok


def load(directory: Path) -> Tokenizer:
    """Rebuild the tokenizer saved in ``directory`` (a run's ``tokenizer/`` folder).

    Every file a plugin may read stays inside ``directory``: ``*_file`` entries of
    ``tokenizer.json`` must name files there, and no file there may be a link out of it.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        _check_inside(directory, meta_path)
        meta = json.loads(meta_path.read_text())
        name = meta["name"]
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer files missing: {meta_path} not found") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{meta_path} is corrupt") from e
    for key, value in meta.items():
        if key.endswith("_file"):
            if not isinstance(value, str) or not value or Path(value).is_absolute():
                raise TokenizerError(f"{meta_path}: '{key}' must name a file in {directory}")
            _check_inside(directory, directory / value)
    for path in directory.iterdir():
        _check_inside(directory, path)
    added = meta.pop("added_tokens", None) or {}
    try:
        added = sorted(((int(i), str(t)) for t, i in added.items()))
    except (AttributeError, TypeError, ValueError) as e:
        raise TokenizerError(f"{meta_path}: 'added_tokens' is corrupt") from e
    if added and isinstance(meta.get("vocab_size"), int):
        meta["vocab_size"] -= len(added)  # what the plugin itself has
    try:
        cls = plugin_class(name)
    except TokenizerError as e:
        raise MissingPluginError(f"{meta_path} needs the tokenizer plugin '{name}': "
                                 f"{e.message}", "install the package that provides it"
                                 + (f" ({e.hint})" if e.hint else "")) from e
    tok = cls.load(directory, meta)
    if [i for i, _ in added] != tok.add_special_tokens([t for _, t in added]):
        raise TokenizerError(f"{meta_path}: the ids of 'added_tokens' do not follow the "
                             "tokenizer's own vocabulary")
    return tok


def _check_inside(directory: Path, path: Path) -> None:
    root, real = directory.resolve(), path.resolve()
    if root not in real.parents:
        raise TokenizerError(f"{path} points outside {directory}",
                             "a tokenizer folder must hold its own files; remove the link")

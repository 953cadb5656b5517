"""The character tokenizer: every distinct character of the training text is a token.

The classic char-rnn / nanoGPT "shakespeare_char" setup. The vocabulary is learned from the
training split (sorted, so it is deterministic), then ``<unk>`` for characters never seen
and end-of-text. Encoding maps code points to ids with a vectorised binary search, so
multi-megabyte texts encode in milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from minigpt_tokenizers import TextSource, Tokenizer, TokenizerError

VOCAB_FILE = "vocab.json"
UNK_TEXT = "\ufffd"


def _code_points(text: str) -> np.ndarray:
    # surrogatepass keeps lone surrogates as their own code points instead of raising
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharTokenizer(Tokenizer):
    """Characters seen in training as tokens; ``unk_id`` for others; then end-of-text."""

    name = "char"
    needs_training = True

    def __init__(self, chars: list[str]):
        if not chars or chars != sorted(set(chars)) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be a non-empty sorted list of distinct characters")
        self.spec = "char"
        self.chars = chars
        self.unk_id = len(chars)
        self.eot_id = len(chars) + 1
        self.vocab_size = len(chars) + 2
        self._codes = _code_points("".join(chars))  # sorted, so searchsorted finds ids
        self._itos = [*chars, UNK_TEXT, ""]  # end-of-text renders as nothing

    @classmethod
    def create(cls, arg: str, training_text: TextSource | None = None) -> CharTokenizer:
        if arg:
            raise TokenizerError(f"the char tokenizer takes no argument (got 'char:{arg}')",
                                 "use the spec 'char'")
        if training_text is None:
            raise TokenizerError("the char tokenizer learns its vocabulary from training text",
                                 "create it with the training data (e.g. through `minigpt train`)")
        seen: set[str] = set()
        for chunk in training_text():
            seen.update(chunk)  # set.update over a str runs in C
        if not seen:
            raise TokenizerError("the training text is empty; no characters to learn",
                                 "check the dataset, or use the 'byte' tokenizer")
        return cls(sorted(seen))

    @classmethod
    def load(cls, directory: Path, meta: dict) -> CharTokenizer:
        path = directory / meta.get("vocab_file", VOCAB_FILE)
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))["chars"]
            return cls(chars)
        except FileNotFoundError as e:
            raise TokenizerError(f"char vocabulary missing: {path} not found") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"char vocabulary {path} is corrupt") from e

    def save_files(self, directory: Path) -> dict:
        # ensure_ascii keeps the file valid even for lone surrogates in the training text
        (directory / VOCAB_FILE).write_text(json.dumps({"chars": self.chars}) + "\n")
        return {"vocab_file": VOCAB_FILE}

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        cps = _code_points(text)
        ids = np.searchsorted(self._codes, cps)
        found = self._codes[np.minimum(ids, len(self._codes) - 1)] == cps
        return np.where(found, ids, self.unk_id).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        itos, n = self._itos, len(self._itos)
        return "".join(itos[i] if 0 <= i < n else self._other(i) for i in map(int, ids))

    def _other(self, i: int) -> str:
        special = self.added_token_bytes(i)
        return UNK_TEXT if special is None else special.decode()

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

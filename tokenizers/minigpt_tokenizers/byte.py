"""The byte tokenizer: every UTF-8 byte is a token.

No training, no files, no unknown tokens: ids 0-255 are the bytes of the UTF-8 encoding and
256 is end-of-text. The vocabulary is tiny, so sequences are long; it is the safe default
for any text in any language.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from minigpt_tokenizers import TextSource, Tokenizer, TokenizerError

EOT_ID = 256
REPLACEMENT = "\ufffd".encode()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, plus one end-of-text token."""

    name = "byte"
    needs_training = False

    def __init__(self) -> None:
        self.spec = "byte"
        self.vocab_size = 257
        self.eot_id = EOT_ID

    @classmethod
    def create(cls, arg: str, training_text: TextSource | None = None) -> ByteTokenizer:
        if arg:
            raise TokenizerError(f"the byte tokenizer takes no argument (got 'byte:{arg}')",
                                 "use the spec 'byte'")
        return cls()

    @classmethod
    def load(cls, directory: Path, meta: dict) -> ByteTokenizer:
        return cls()

    def save_files(self, directory: Path) -> dict:
        return {}

    def encode(self, text: str) -> list[int]:
        # surrogatepass: a lone surrogate becomes its (invalid) UTF-8 bytes instead of raising
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """End-of-text renders as nothing, added special tokens as their text, other ids
        outside the vocabulary as U+FFFD."""
        ids = list(ids)
        try:
            return bytes(ids)  # fast path: only byte ids
        except (ValueError, TypeError):
            pass
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i != EOT_ID:
                out += self.added_token_bytes(i) or REPLACEMENT
        return bytes(out)

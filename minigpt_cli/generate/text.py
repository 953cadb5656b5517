"""Streamed text: token ids in, whole characters out, cut at stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

# Seconds between deliveries of streamed text (to a terminal, or a server's stream): what is
# sampled meanwhile goes out in one piece. 50 updates a second read as continuous, and the
# reader (a terminal, an event loop sharing the CPU with decoding) wakes 50 times a second
# instead of once per token.
STREAM_INTERVAL = 0.02


class TextStream:
    """Token ids in, text out as soon as it is whole characters; ``push``es plus ``flush``
    equal ``tokenizer.decode`` of all the tokens.

    With ``decode_bytes``, an incremental UTF-8 decoder says whether the bytes so far end
    inside a character. The text itself comes from the tokenizer's ``decode`` of the tokens
    since the last character boundary (with the token before them as left context, for
    decoders that treat a first token specially, like a SentencePiece dummy prefix), so
    invalid bytes become U+FFFD just as ``decode`` has them; while a character is unfinished
    the U+FFFD standing for its bytes so far is held back. Without ``decode_bytes``, all the
    tokens are decoded again and the part that has settled (no trailing U+FFFD) is released.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decode_bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # the tokens since the last boundary (and the one before)
        self._context = 0  # 1 when self._ids starts with the token before the boundary
        self._released = 0  # characters of the text of self._ids already returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._decode_bytes is None:
            return self._release(self.tokenizer.decode(self._ids), boundary=False)
        self._utf8.decode(self._decode_bytes([token_id]))
        unfinished = bool(self._utf8.getstate()[0])
        return self._release(self._text(), boundary=not unfinished)

    def flush(self) -> str:
        if self._decode_bytes is None:
            text = self.tokenizer.decode(self._ids)
        else:
            self._utf8.reset()
            text = self._text()
        out = text[self._released:]
        self._released += len(out)
        return out

    def _text(self) -> str:
        text = self.tokenizer.decode(self._ids)
        if self._context:
            text = text[len(self.tokenizer.decode(self._ids[:1])):]
        return text

    def _release(self, text: str, boundary: bool) -> str:
        if not boundary:
            text = text.rstrip("\ufffd")  # perhaps an unfinished character: wait
        out = text[self._released:]
        self._released = max(self._released, len(text))
        if boundary:
            self._ids, self._context, self._released = self._ids[-1:], 1, 0
        return out


class StopFilter:
    """Cuts text at the first stop string; holds back text that could begin one.

    With ``reply`` (a chat reply), a stop made of whitespace only counts after the reply's
    first visible character: a base model that opens its reply with the blank line that
    the plain template's ``"\n\n"`` stands for still gets to say something, while a model
    that goes straight to ``"\nUser:"`` still gives an empty reply.
    """

    def __init__(self, stops: Iterable[str], reply: bool = False):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self._reply = reply
        self._seen_text = False  # visible text was released

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to release, and whether a stop string was found (it is not released)."""
        if not self.stops:
            return text, False
        pending = self._pending + text
        hits = [i for i in (self._find(pending, s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[:min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        self._pending = pending[len(pending) - hold:]
        out = pending[:len(pending) - hold]
        self._seen_text = self._seen_text or bool(out.strip())
        return out, False

    def _find(self, pending: str, stop: str) -> int:
        i = pending.find(stop)
        if self._reply and not self._seen_text and not stop.strip():
            while i >= 0 and not pending[:i].strip():  # still before the reply's text
                i = pending.find(stop, i + 1)
        return i

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

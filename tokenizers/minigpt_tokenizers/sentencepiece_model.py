"""SentencePiece subword tokenizers, trained on the run's own data or loaded from a file.

``sentencepiece:unigram:8000`` / ``sentencepiece:bpe:8000`` (also ``sentencepiece:8000`` and
bare ``sentencepiece``, both unigram) train a model on the training split in seconds;
``sentencepiece:path/to/file.model`` loads an existing one.

Training is set up so every string round-trips exactly: identity normalisation, no dummy
prefix, whitespace kept as is, byte fallback for characters outside the vocabulary and
``"\\n"`` as a piece of its own. The control pieces are named ``<|unk|>``, ``<|startoftext|>``
and ``<|endoftext|>`` because the trainer drops any text that spells a control piece: with the
default ``<unk>`` it would never learn WikiText's literal ``<unk>``, nor even ``<`` and ``>``.

For models with "\\n" as a piece of its own, text is encoded line by line (in one parallel
batch call): that is exactly what encoding the whole text gives up to ties, is three times
faster for BPE, and makes the ids of a text independent of how callers cut it at newlines.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from minigpt_tokenizers import TextSource, Tokenizer, TokenizerError

MODEL_FILE = "tokenizer.model"
MODEL_TYPES = ("unigram", "bpe")
DEFAULT_TYPE, DEFAULT_VOCAB = "unigram", 8000
MAX_TRAIN_CHARS = 8_000_000  # the first ~8 MB of the training split: seconds to train
MAX_SENTENCE_CHARS = 2048  # at most 8192 UTF-8 bytes, the max_sentence_length below
ENCODE_THREADS = max(1, min(8, os.cpu_count() or 1))
SPEC_HINT = ("use sentencepiece:unigram:8000, sentencepiece:bpe:8000 "
             "or sentencepiece:path/to/file.model")

TRAINER_OPTIONS = dict(
    byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
    user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<|unk|>", bos_piece="<|startoftext|>", eos_piece="<|endoftext|>",
    input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192,
    num_threads=4,  # fixed, not os.cpu_count(): unigram's result depends on the thread count
    minloglevel=2,
)


def _valid_utf8(text: str) -> str:
    """Replace lone surrogates, which sentencepiece's bindings refuse, with U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _looks_like_path(arg: str) -> bool:
    return "/" in arg or os.sep in arg or arg.endswith(".model") or Path(arg).is_file()


def _parse(arg: str) -> tuple[str, int]:
    parts = arg.split(":") if arg else []
    model_type = parts.pop(0) if parts and parts[0] in MODEL_TYPES else DEFAULT_TYPE
    vocab_size = int(parts.pop(0)) if parts and parts[0].isdigit() else DEFAULT_VOCAB
    if parts:
        raise TokenizerError(f"bad sentencepiece spec 'sentencepiece:{arg}'", SPEC_HINT)
    return model_type, vocab_size


def _sentences(training_text: TextSource) -> list[str]:
    """Non-empty lines from the start of the training text, long ones cut into pieces."""
    out, size = [], 0
    for chunk in training_text():
        for line in _valid_utf8(chunk).split("\n"):
            for i in range(0, len(line), MAX_SENTENCE_CHARS):
                out.append(line[i:i + MAX_SENTENCE_CHARS])
                size += len(out[-1])
                if size >= MAX_TRAIN_CHARS:
                    return out
    return out


def _train(model_type: str, vocab_size: int, training_text: TextSource) -> bytes:
    import sentencepiece as spm

    sentences = _sentences(training_text)
    if not sentences:
        raise TokenizerError("the training text is empty; sentencepiece has nothing to learn")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                       model_type=model_type, vocab_size=vocab_size,
                                       **TRAINER_OPTIONS)
    except RuntimeError as e:
        # drop the C++ source location; some checks say nothing more (vocab_size 0, 1, 2)
        text = str(e)
        msg = (text.rsplit("] ", 1)[-1].strip().splitlines() or [""])[0]
        hint = None
        if not msg and vocab_size < len(TRAINER_OPTIONS["user_defined_symbols"]) + 3:
            msg = f"a vocabulary of {vocab_size} pieces is too small"
            hint = f"use a larger vocabulary, e.g. sentencepiece:{model_type}:{DEFAULT_VOCAB}"
        elif not msg:
            msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        elif m := re.search(r"value <= (\d+)", msg):
            hint = (f"the training text supports at most {m[1]} pieces: "
                    f"use a smaller vocabulary, e.g. sentencepiece:{model_type}:{m[1]}")
        elif m := re.search(r"required_chars\. \d+ vs (\d+)", msg):
            hint = f"use a vocabulary of at least {m[1]} pieces"
        raise TokenizerError(f"sentencepiece training failed: {msg}", hint) from e
    return model.getvalue()


def _read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        what = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror})"
        raise TokenizerError(f"sentencepiece model {what}: {path}",
                             "check the path, or train one: sentencepiece:unigram:8000") from e


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its end-of-sequence piece is the end-of-text token."""

    name = "sentencepiece"
    needs_training = True  # a spec naming a .model file ignores the training text

    def __init__(self, spec: str, model_proto: bytes, source: str = "the model"):
        import sentencepiece as spm

        self.spec = spec
        self.sp = sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise TokenizerError(f"{source} is not a valid sentencepiece model") from e
        self.vocab_size = sp.get_piece_size()
        self.eot_id = sp.eos_id()
        if self.eot_id < 0:
            raise TokenizerError(f"{source} has no end-of-sequence piece",
                                 "train one with an eos piece, e.g. sentencepiece:unigram:8000")
        self._newline_id = self._line_split_id()

    def _line_split_id(self) -> int | None:
        """The id of "\\n" if lines can be encoded one by one without changing the result."""
        nl, probe = self.sp.piece_to_id("\n"), " a \n  b \n"
        by_line = [*self.sp.encode(" a "), nl, *self.sp.encode("  b "), nl]
        ok = self.sp.encode(probe) == by_line and self.sp.decode(by_line) == probe
        return nl if ok and not self.sp.is_unknown(nl) else None

    @classmethod
    def create(cls, arg: str, training_text: TextSource | None = None) -> SentencePieceTokenizer:
        spec = f"sentencepiece:{arg}" if arg else "sentencepiece"
        if _looks_like_path(arg):
            path = Path(arg).expanduser()
            return cls(spec, _read_model(path), str(path))
        model_type, vocab_size = _parse(arg)
        if training_text is None:
            raise TokenizerError(f"{spec} learns its vocabulary from training text",
                                 "create it with the training data, or load a model file: "
                                 "sentencepiece:path/to/file.model")
        return cls(spec, _train(model_type, vocab_size, training_text))

    @classmethod
    def load(cls, directory: Path, meta: dict) -> SentencePieceTokenizer:
        path = directory / meta.get("model_file", MODEL_FILE)
        tok = cls(meta.get("spec", "sentencepiece"), _read_model(path), str(path))
        if "vocab_size" in meta and tok.vocab_size != meta["vocab_size"]:
            raise TokenizerError(f"{path} does not match tokenizer.json "
                                 f"({tok.vocab_size} pieces, expected {meta['vocab_size']})")
        return tok

    def save_files(self, directory: Path) -> dict:
        (directory / MODEL_FILE).write_bytes(self.sp.serialized_model_proto())
        return {"model_file": MODEL_FILE}

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = [_valid_utf8(t) for t in texts]
        nl = self._newline_id
        if not texts:
            return []
        if nl is None:
            return self.sp.encode(texts, num_threads=ENCODE_THREADS)
        split = [text.split("\n") for text in texts]
        encoded = iter(self.sp.encode([ln for lines in split for ln in lines],
                                      num_threads=ENCODE_THREADS))
        out = []
        for lines in split:
            ids = list(next(encoded))
            for _ in lines[1:]:
                ids.append(nl)
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if all(0 <= i < len(self._piece_bytes) for i in ids):
            return self.sp.decode(ids)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Piece by piece; differs from :meth:`decode` only for ids outside the vocabulary
        (U+FFFD) and where decode drops a leading space (models with a dummy prefix)."""
        table, n = self._piece_bytes, len(self._piece_bytes)
        return b"".join(table[i] if 0 <= i < n else self.added_token_bytes(i) or
                        "\ufffd".encode() for i in map(int, ids))

    @cached_property
    def _piece_bytes(self) -> list[bytes]:
        sp, table = self.sp, []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # "<0x0A>"
                table.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unused(i):
                table.append(b"")
            elif sp.is_unknown(i):
                table.append(sp.decode([i]).encode())
            else:
                table.append(piece.replace("\u2581", " ").encode())
        return table

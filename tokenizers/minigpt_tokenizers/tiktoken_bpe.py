"""OpenAI's byte-level BPE encodings through tiktoken (``tiktoken:gpt2``, ``tiktoken:FILE``).

``tiktoken:NAME`` asks tiktoken for a named encoding, which downloads its ranks once. For
machines without network, ``tiktoken:path/to/gpt2.tiktoken`` reads a local ranks file; the
file's sha256 identifies which OpenAI encoding it is, so the split pattern and special tokens
match the real one. Either way the run directory gets its own copy of the ranks, pattern and
special tokens, so a trained model never needs the network again.

Local files are parsed here rather than with ``tiktoken.load.load_tiktoken_bpe``: that
function caches every path it reads in a temp folder keyed by the path, so an edited file at
the same path would silently load stale ranks; writing needs ``blobfile``, which is optional.
The format is the same: one ``base64(token) rank`` per line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minigpt_tokenizers import TextSource, Tokenizer, TokenizerError

EOT = "<|endoftext|>"
RANKS_FILE = "ranks.tiktoken"
REPLACEMENT = "\ufffd".encode()
NUM_THREADS = max(1, min(8, os.cpu_count() or 1))  # for encode_batch
_EXTRA_LOCK = threading.Lock()  # builds each tokenizer's extra encodings once

# Split patterns copied from tiktoken_ext/openai_public.py (calling it would download).
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-2's pattern as older tiktoken versions wrote it, before possessive quantifiers
R50K_PAT_OLD = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
              r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Each pattern without its look-ahead, for minigpt_tokenizers.split_free, and whether it ends
# a piece at a run's last newline (True) before anything else happens to the run
_R50K_FREE = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""
LOOKAHEAD_FREE = {
    R50K_PAT: (_R50K_FREE, False),
    R50K_PAT_OLD: (_R50K_FREE, False),
    CL100K_PAT: (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+""", True),
    O200K_PAT: (O200K_PAT.replace(r"""|\s+(?!\S)|\s+""", r"""|\s+"""), True),
}

# sha256 of the published ranks files -> (name, pattern, special tokens, explicit n_vocab).
# r50k_base's ranks are GPT-2's, so gpt2.tiktoken files land on the first entry.
KNOWN_RANKS = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930":
        ("r50k_base", R50K_PAT, {EOT: 50256}, 50257),
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069":
        ("p50k_base", R50K_PAT, {EOT: 50256}, 50281),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7":
        ("cl100k_base", CL100K_PAT, {EOT: 100257, "<|fim_prefix|>": 100258,
                                     "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                     "<|endofprompt|>": 100276}, None),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d":
        ("o200k_base", O200K_PAT, {EOT: 199999, "<|endofprompt|>": 200018}, None),
}


def _looks_like_path(arg: str) -> bool:
    return "/" in arg or os.sep in arg or arg.endswith(".tiktoken") or Path(arg).is_file()


def _read_ranks(path: Path) -> tuple[dict[bytes, int], str]:
    """Parse a ranks file; return the ranks and the file's sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise TokenizerError(f"tiktoken ranks file not found: {path}",
                             "check the path, or use a named encoding such as tiktoken:gpt2") from e
    except OSError as e:
        raise TokenizerError(f"cannot read tiktoken ranks file {path}: {e.strerror}") from e
    try:
        ranks = {}
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:  # also binascii.Error
        raise TokenizerError(f"{path} is not a tiktoken ranks file (bad line {line[:40]!r})",
                             "expected lines of 'base64-token rank'") from e
    if not ranks:
        raise TokenizerError(f"{path} is not a tiktoken ranks file (it is empty)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken panics on a text with such a byte
        raise TokenizerError(f"{path} is not a byte-level BPE: {len(missing)} of the 256 "
                             f"single bytes have no rank (such as {bytes(missing[:1])!r})",
                             "a ranks file needs a rank for every byte value")
    return ranks, hashlib.sha256(data).hexdigest()


def _build(name: str, pat_str: str, ranks: dict[bytes, int], special_tokens: dict[str, int],
           n_vocab: int | None = None):
    import tiktoken

    if EOT not in special_tokens:  # every minigpt tokenizer needs an end-of-text token
        top = max([*ranks.values(), *special_tokens.values()])
        special_tokens, n_vocab = {**special_tokens, EOT: top + 1}, None
    try:
        return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens=special_tokens, explicit_n_vocab=n_vocab)
    except Exception as e:  # AssertionError from the n_vocab check, ValueError from Rust
        raise TokenizerError(f"cannot build tiktoken encoding '{name}': {e}") from e


def _from_name(name: str):
    import tiktoken

    names = tiktoken.list_encoding_names()
    if name not in names:
        raise TokenizerError(f"unknown tiktoken encoding '{name}'",
                             f"available: {', '.join(names)}; or tiktoken:path/to/ranks.tiktoken")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError/HTTPError, hash mismatch, ...
        raise TokenizerError(
            f"could not download tiktoken encoding '{name}' ({type(e).__name__})",
            f"offline, point at a local ranks file: tiktoken:path/to/{name}.tiktoken") from e


class TiktokenTokenizer(Tokenizer):
    """A tiktoken ``Encoding``; special-token text in the input is encoded as plain text."""

    name = "tiktoken"
    needs_training = False

    def __init__(self, spec: str, enc):
        self.spec = spec
        self.enc = enc
        self.vocab_size = enc.n_vocab
        self.eot_id = enc.eot_token
        self._extra: dict = {}  # encodings built on first use (split_free, markers)

    @classmethod
    def create(cls, arg: str, training_text: TextSource | None = None) -> TiktokenTokenizer:
        arg = arg or "gpt2"
        if not _looks_like_path(arg):
            return cls(f"tiktoken:{arg}", _from_name(arg))
        path = Path(arg).expanduser()
        ranks, sha = _read_ranks(path)
        # An unknown file gets GPT-2's split pattern and end-of-text after the last rank.
        name, pat, specials, n_vocab = KNOWN_RANKS.get(
            sha, (path.stem, R50K_PAT, {EOT: max(ranks.values()) + 1}, None))
        return cls(f"tiktoken:{arg}", _build(name, pat, ranks, specials, n_vocab))

    @classmethod
    def from_ranks(cls, spec: str, name: str, ranks: dict[bytes, int], pat_str: str = R50K_PAT,
                   special_tokens: dict[str, int] | None = None) -> TiktokenTokenizer:
        """Build from ranks held in memory (a tokenizer imported from another format);
        end-of-text goes after the last id when ``special_tokens`` has none."""
        specials = dict(special_tokens or {})
        if EOT not in specials:
            specials[EOT] = max(max(ranks.values()), *specials.values(), 0) + 1
        return cls(spec, _build(name, pat_str, ranks, specials))

    @classmethod
    def load(cls, directory: Path, meta: dict) -> TiktokenTokenizer:
        ranks, _ = _read_ranks(directory / meta.get("ranks_file", RANKS_FILE))
        try:
            specials = {str(k): int(v) for k, v in meta["special_tokens"].items()}
            enc = _build(meta.get("encoding", "custom"), meta["pat_str"], ranks, specials)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TokenizerError(f"tiktoken metadata in {directory} is corrupt") from e
        if "vocab_size" in meta and enc.n_vocab != meta["vocab_size"]:
            raise TokenizerError(f"tiktoken files in {directory} do not match tokenizer.json "
                                 f"({enc.n_vocab} tokens, expected {meta['vocab_size']})")
        return cls(meta.get("spec", "tiktoken"), enc)

    def save_files(self, directory: Path) -> dict:
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        (directory / RANKS_FILE).write_bytes(
            b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in ranks))
        return {"encoding": self.enc.name, "ranks_file": RANKS_FILE,
                "pat_str": self.enc._pat_str, "special_tokens": self.enc._special_tokens}

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many (short) texts: in groups, one per thread, each group joined into one call
        (``markers.JoinedBatch``) instead of tiktoken's one thread-pool task per text."""
        from minigpt_tokenizers.markers import JoinedBatch

        batch = self._extra_encoding("joined", lambda: JoinedBatch(self.enc))

        def group(part: list[str]) -> list[list[int]]:
            ids = batch.encode(part)
            if ids is None:
                return [self.enc.encode_ordinary(t) for t in part]
            return [a.tolist() for a in ids]
        if len(texts) <= 1:
            return [self.enc.encode_ordinary(t) for t in texts]
        n = min(NUM_THREADS, len(texts))
        parts = [texts[len(texts) * i // n:len(texts) * (i + 1) // n] for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            return [ids for part in pool.map(group, parts) for ids in part]

    def encode_arrays(self, texts: list[str]) -> list:
        """One thread per text, up to NUM_THREADS (tiktoken releases the GIL), straight
        into NumPy: the ids of ``encode_ordinary``, special-token text encoded as text.
        The split patterns of OpenAI's encodings go through :mod:`minigpt_tokenizers.split_free`."""
        split_free = self._split_free_encoder()

        def one(text: str):
            ids = split_free.encode(text) if split_free is not None else None
            if ids is None:
                ids = self.enc.encode_to_numpy(text, allowed_special=set(),
                                               disallowed_special=())
            return ids
        if len(texts) <= 1:
            return [one(t) for t in texts]
        with ThreadPoolExecutor(min(NUM_THREADS, len(texts))) as pool:
            return list(pool.map(one, texts))

    def _split_free_encoder(self):
        """The look-ahead-free encoder of this encoding's pattern; None for other patterns."""
        from minigpt_tokenizers.split_free import SplitFreeEncoder

        if self.enc._pat_str not in LOOKAHEAD_FREE:
            return None
        return self._extra_encoding("split_free", lambda: SplitFreeEncoder(
            self.enc, *LOOKAHEAD_FREE[self.enc._pat_str]))

    def _extra_encoding(self, name: str, build):
        with _EXTRA_LOCK:
            if name not in self._extra:
                self._extra[name] = build()
            return self._extra[name]

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Special tokens (the encoding's and added ones) render as their text; other ids
        outside the vocabulary as U+FFFD."""
        ids = [int(i) for i in ids]
        try:
            return self.enc.decode_bytes(ids)
        except (KeyError, OverflowError, ValueError):
            return b"".join(self._token_bytes(i) for i in ids)

    def _token_bytes(self, i: int) -> bytes:
        special = self.added_token_bytes(i)
        if special is not None:
            return special
        try:
            return self.enc.decode_single_token_bytes(i)
        except (KeyError, OverflowError, ValueError):
            return REPLACEMENT

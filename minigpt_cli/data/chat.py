"""Conversation data for supervised fine-tuning: JSONL files of ``{"messages": [...]}``,
token ids with a loss mask, and the packed rows training reads.

A line of a chat file is ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}`` (OpenAI's fine-tuning files, Hugging Face's chat datasets). A
file is checked whole when it is resolved: a bad line is a one-line :class:`DataError`
naming the file and the line, before anything is written.

Each conversation is rendered by the chat template into ids and per-token flags (trained,
turn start, conversation start); the token cache stores both. For training the
conversations are *packed*: rows of ``seq_len`` tokens hold whole conversations one after
another, and the rest of a row is padding (end-of-text, never a target). The first token of
a row is never a target either, so no target ever depends on another row. A conversation
longer than a row is split at turn boundaries; a single turn longer than a row is cut to
its first ``seq_len`` tokens. Both count as *cut*, and ``inspect data`` reports how many.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt_cli import paths
from minigpt_cli.data.source import DataSource
from minigpt_cli.data.token_cache import token_dtype
from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_write

ROLES = ("system", "user", "assistant")
FOLDER_FILES = {"train": ("train.jsonl",),
                "val": ("valid.jsonl", "val.jsonl", "validation.jsonl"),
                "test": ("test.jsonl",)}
JSON_LINES = (".jsonl", ".jsonlines", ".json-lines", ".ndjson")  # suffixes of JSON Lines files
CHAT_CACHE_VERSION = 1
TRAINED, TURN_START, CONV_START = 1, 2, 4  # bits of the flags array

Conversation = list[dict[str, str]]


def check_conversation(obj: Any, where: str) -> Conversation:
    """The messages of one parsed line (or dataset row), or a DataError naming ``where``."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise DataError(f"{where}: missing 'messages'",
                        'each line must be {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of messages")
    if not messages:
        raise DataError(f"{where}: empty conversation (no messages)")
    out = []
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {k} must have a 'role' and a text 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {k} has unknown role {role!r}",
                            f"roles are {', '.join(ROLES)}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800": half a surrogate pair
            raise DataError(f"{where}: message {k} holds a lone surrogate "
                            f"({m['content'][e.start]!r}), which is not text",
                            "escape whole characters only (\\ud83d\\ude00, not \\ud83d "
                            "alone)") from e
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return out


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for every non-blank line of a JSON Lines file, ``where`` being
    ``path:line``; a line that is not UTF-8 or not JSON is a DataError naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})",
                            "convert the file to UTF-8") from e
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from e
        yield where, obj


def read_jsonl(path: Path) -> list[Conversation]:
    """Every conversation of a chat JSONL file, checked line by line."""
    conversations = [check_conversation(obj, where) for where, obj in json_lines(path)]
    if not conversations:
        raise DataError(f"{path} has no conversations", "one JSON object per line")
    return conversations


def looks_like_chat(path: Path) -> bool:
    """Whether a file's first non-blank line is a JSON object with ``messages``."""
    obj = first_json_line(path)
    return isinstance(obj, dict) and "messages" in obj


def first_json_line(path: Path) -> Any:
    """The JSON value of a file's first non-blank line; None when it is not JSON.

    In a JSON Lines file (``.jsonl``), a first line that starts like an object but is not
    JSON is the same error as a broken line further on, not a sign of plain text.
    """
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8-sig")
                except UnicodeDecodeError:
                    return None  # not text: the text reader says why
                try:
                    return json.loads(line)
                except ValueError as e:
                    if path.suffix.lower() in JSON_LINES and raw.lstrip().startswith(b"{"):
                        raise DataError(f"{path}:{lineno}: not JSON "
                                        f"({getattr(e, 'msg', e)})") from e
                    return None
    except OSError:
        return None
    return None


def chat_folder_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, names in FOLDER_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found[split] = folder / name
                break
    return found


class ChatSource(DataSource):
    """Conversations in named splits; ``iter_text`` gives the template's text of them (for
    tokenizers that learn a vocabulary), :meth:`conversations` the messages."""

    kind = "chat"

    def __init__(self, name: str, parts: dict[str, list[Conversation]], files=()):
        self.name = name
        self._parts = parts
        self.files = [str(f) for f in files]
        self.template = None  # set by the caller that knows the run's template
        self._fingerprints: dict[str, str] = {}

    def splits(self) -> list[str]:
        return list(self._parts)

    def conversations(self, split: str) -> list[Conversation]:
        return self._parts[self.check_split(split)]

    def iter_text(self, split: str) -> Iterator[str]:
        for conv in self.conversations(split):
            yield (self.template.text(conv) if self.template is not None
                   else "\n".join(m["content"] for m in conv)) + "\n"

    def fingerprint(self, split: str) -> str:
        split = self.check_split(split)
        if split not in self._fingerprints:
            blob = json.dumps(self._parts[split], ensure_ascii=False, separators=(",", ":"))
            self._fingerprints[split] = hashlib.sha256(b"minigpt-chat-v1" +
                                                       blob.encode()).hexdigest()
        return self._fingerprints[split]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "chat", "files": self.files,
                "splits": {s: {"conversations": len(c)} for s, c in self._parts.items()}}


def split_last(conversations: list[Conversation], val_fraction: float,
               name: str) -> dict[str, list[Conversation]]:
    """The last ``val_fraction`` of the conversations (at least one) as validation."""
    n_val = max(1, int(len(conversations) * val_fraction))
    if len(conversations) - n_val < 1:
        raise DataError(f"{name} has {len(conversations)} conversation(s), too few to hold "
                        "some out for validation", "add conversations, or a valid.jsonl")
    return {"train": conversations[:-n_val], "val": conversations[-n_val:]}


def file_source(spec: str, path: Path, val_fraction: float) -> ChatSource:
    return ChatSource(spec, split_last(read_jsonl(path), val_fraction, spec), [path])


def folder_source(spec: str, folder: Path, val_fraction: float) -> ChatSource:
    found = chat_folder_files(folder)
    if "train" not in found:
        raise DataError(f"{folder} has no train.jsonl")
    parts = {split: read_jsonl(path) for split, path in found.items()}
    if "val" not in parts:
        parts.update(split_last(parts.pop("train"), val_fraction, spec))
    order = [s for s in ("train", "val", "test") if s in parts]
    return ChatSource(spec, {s: parts[s] for s in order}, found.values())


# ---- ids and flags, cached -------------------------------------------------------------------

@dataclass
class ChatTokens:
    """A split's conversations as ids and flags (read-only memmaps)."""

    tokens: np.ndarray
    flags: np.ndarray
    num_conversations: int
    path: Path
    reused: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


def encode_conversations(conversations: list[Conversation], tokenizer,
                         template) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    flags: list[int] = []
    for conv in conversations:
        r = template.render(tokenizer, conv)
        f = [TRAINED if t else 0 for t in r.trained]
        for s in r.turn_starts:
            f[s] |= TURN_START
        if f:
            f[0] |= CONV_START | TURN_START
        ids.extend(r.ids)
        flags.extend(f)
    return (np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size)),
            np.asarray(flags, dtype=np.uint8))


def chat_token_cache(source: ChatSource, split: str, tokenizer, template,
                     cache_dir: Path | None = None,
                     progress: Callable[[int, int], None] | None = None) -> ChatTokens:
    """Ids and flags of ``split`` rendered with ``template``, encoded once and cached,
    keyed as text splits are (content, split, tokenizer) and by the template."""
    split = source.check_split(split)
    folder = Path(cache_dir or paths.cache_dir()) / "tokens"
    key = hashlib.sha256(
        f"minigpt-chat-v{CHAT_CACHE_VERSION}\0{source.fingerprint(split)}\0{split}\0"
        f"{tokenizer.fingerprint()}\0{template.name}".encode()).hexdigest()[:32]
    bin_path, flag_path, meta_path = (folder / f"{key}.bin", folder / f"{key}.mask",
                                      folder / f"{key}.json")
    dtype = token_dtype(int(tokenizer.vocab_size))
    cached = _load(bin_path, flag_path, meta_path, dtype)
    if cached is not None:
        return cached
    conversations = source.conversations(split)
    if progress is not None:
        progress(0, len(conversations))
    ids, flags = encode_conversations(conversations, tokenizer, template)
    if progress is not None:
        progress(len(conversations), len(conversations))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(bin_path, ids.tobytes())
        atomic_write(flag_path, flags.tobytes())
        meta = {"version": CHAT_CACHE_VERSION, "dtype": dtype.name, "num_tokens": len(ids),
                "num_conversations": len(conversations), "source": source.name,
                "split": split, "template": template.name,
                "tokenizer_spec": getattr(tokenizer, "spec", "")}
        atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write the token cache in {folder}: {e.strerror or e}",
                        "set MINIGPT_CACHE_DIR to a writable folder with free space") from e
    entry = _load(bin_path, flag_path, meta_path, dtype)
    assert entry is not None, f"token cache entry {bin_path} unreadable right after writing"
    entry.reused = False
    return entry


def _load(bin_path: Path, flag_path: Path, meta_path: Path, dtype) -> ChatTokens | None:
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["num_tokens"])
        if (meta.get("version") != CHAT_CACHE_VERSION or meta["dtype"] != dtype.name or n <= 0
                or bin_path.stat().st_size != n * dtype.itemsize
                or flag_path.stat().st_size != n):
            return None
        return ChatTokens(np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)),
                          np.memmap(flag_path, dtype=np.uint8, mode="r", shape=(n,)),
                          int(meta["num_conversations"]), bin_path, reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- packing ---------------------------------------------------------------------------------

@dataclass
class Packed:
    """Rows of ``seq_len`` tokens (plus one end token) and their targets' mask."""

    tokens: np.ndarray  # (rows * seq_len + 1,)
    mask: np.ndarray  # bool, same length: True where the token is a training target
    rows: int
    conversations: int
    cut: int  # conversations split at a turn boundary or truncated
    truncated: int  # of those, ones where a turn longer than a row lost its end
    trained_tokens: int


def pieces(chat: ChatTokens, seq_len: int) -> tuple[list[tuple[int, int]], int, int]:
    """Spans of at most ``seq_len`` tokens: whole conversations, or parts cut at turn
    starts; the number of conversations cut and of those truncated."""
    flags = np.asarray(chat.flags)
    conv_starts = np.flatnonzero(flags & CONV_START).tolist() + [len(flags)]
    turn_starts = np.flatnonzero(flags & TURN_START)
    spans, cut, truncated = [], 0, 0
    for a, b in zip(conv_starts, conv_starts[1:], strict=False):
        if b - a <= seq_len:
            spans.append((a, b))
            continue
        cut += 1
        lost = False
        inner = turn_starts[(turn_starts > a) & (turn_starts < b)].tolist() + [b]
        pos = a
        while pos < b:
            fits = [t for t in inner if pos < t <= pos + seq_len]
            if fits:
                end = fits[-1]
                spans.append((pos, end))
                pos = end
            else:  # one turn longer than a row: its first seq_len tokens
                spans.append((pos, pos + seq_len))
                lost = True
                pos = next(t for t in inner if t > pos)
        truncated += lost
    return spans, cut, truncated


def pack(chat: ChatTokens, seq_len: int, pad_id: int) -> Packed:
    spans, cut, truncated = pieces(chat, seq_len)
    rows: list[list[tuple[int, int]]] = [[]]
    used = 0
    for a, b in spans:
        if used + (b - a) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((a, b))
        used += b - a
    n = len(rows)
    tokens = np.full(n * seq_len + 1, pad_id, dtype=np.int64)
    mask = np.zeros(n * seq_len + 1, dtype=bool)
    src_tokens, src_flags = np.asarray(chat.tokens), np.asarray(chat.flags)
    for r, row in enumerate(rows):
        pos = r * seq_len
        for a, b in row:
            tokens[pos:pos + b - a] = src_tokens[a:b]
            mask[pos:pos + b - a] = (src_flags[a:b] & TRAINED) != 0
            pos += b - a
        mask[r * seq_len] = False  # its target would be predicted from the row before
    return Packed(tokens, mask, n, chat.num_conversations, cut, truncated, int(mask.sum()))


def chat_stats(source: ChatSource, tokenizer, template, context: int) -> dict[str, Any]:
    """Per split: conversations, tokens, trained (assistant) tokens, and how many
    conversations training with a context of ``context`` tokens would cut."""
    splits = {}
    for split in source.splits():
        cached = chat_token_cache(source, split, tokenizer, template)
        packed = pack(cached, context, tokenizer.eot_id)
        splits[split] = {"conversations": cached.num_conversations,
                         "tokens": cached.num_tokens,
                         "trained_tokens": int(((np.asarray(cached.flags) & TRAINED) != 0).sum()),
                         "cut": packed.cut, "truncated": packed.truncated, "rows": packed.rows}
    return {"template": template.name, "context": context, "splits": splits}


def example_row(packed: Packed, tokenizer, seq_len: int,
                max_tokens: int = 80) -> list[tuple[str, bool]]:
    """The start of the first training row as ``(text, trained)`` runs: which tokens the
    loss counts, for the closing note of training."""
    n = min(seq_len, max_tokens)
    ids, mask = packed.tokens[:n].tolist(), packed.mask[:n].tolist()
    while ids and ids[-1] == tokenizer.eot_id and not mask[len(ids) - 1]:
        ids.pop()  # padding
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((tokenizer.decode(ids[start:i]), bool(mask[start])))
            start = i
    return runs

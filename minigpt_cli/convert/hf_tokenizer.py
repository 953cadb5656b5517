"""minigpt's tokenizers as Hugging Face tokenizer files, and GPT-2's BPE files as minigpt's.

:func:`save_hf_tokenizer` writes ``tokenizer.json`` (built with the ``tokenizers`` library),
``tokenizer_config.json`` and ``special_tokens_map.json``, so that
``transformers.AutoTokenizer.from_pretrained(folder)`` gives minigpt's ids exactly:

- ``tiktoken``: a byte-level BPE whose vocabulary is the mergeable ranks (id == rank) and
  whose merges are every split of each token into two tokens, ordered by the rank of the
  result (what ``transformers``' ``TikTokenConverter`` does); the encoding's split regex as
  pre-tokenizer (GPT-2's is ByteLevel's own). GPT-2-pattern encodings also get GPT-2's
  ``vocab.json`` + ``merges.txt`` (one merge per token, recovered from the ranks).
- ``byte``: a byte-level BPE with no merges: one token per byte, id = byte value.
- ``char``: one token per character, ``<unk>`` for others (it decodes to U+FFFD, as in
  minigpt).
- ``sentencepiece``: the model's pieces as a Unigram or BPE model with byte fallback, for
  models with identity normalization and no dummy prefix (what minigpt trains); others are
  refused.

minigpt encodes special-token text such as ``<|endoftext|>`` in the input as plain text;
the exported ``tokenizer_config.json`` sets ``split_special_tokens`` so that transformers
does the same (``tokenizers.Tokenizer.from_file`` alone needs ``encode_special_tokens =
True`` for that). A chat template's tokens (``<|user|>``, ``<|end|>``) are special too, so
that ``decode(..., skip_special_tokens=True)`` drops them; ``apply_chat_template`` must
match them in the text it renders, so a tokenizer that has them leaves
``split_special_tokens`` off, as transformers' chat models do: there, special-token text
in the input becomes those tokens, unless ``split_special_tokens=True`` is passed (or
``sanitize_control_tokens=True`` to ``apply_chat_template``, for the messages' text).
One exception: the Unigram model of ``tokenizers`` matches every piece of
the vocabulary, so in a sentencepiece *unigram* export, text that spells a control or byte
piece (``<|endoftext|>``, ``<|unk|>``, ``<0x41>``) gives that piece's id where sentencepiece
encodes the characters; all other text gives the same ids (BPE exports have no exception).
End-of-text decodes to its name in transformers (minigpt's byte, char and sentencepiece
tokenizers render it as nothing). Text with lone surrogates cannot be passed to
``tokenizers`` at all. Every export is checked on a probe text before anything is written;
a tokenizer that would give other ids there is refused.

:func:`load_hf_tokenizer` reads a GPT-2-family folder (``tokenizer.json`` with a byte-level
BPE model, or ``vocab.json`` + ``merges.txt``) as minigpt's tiktoken tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from minigpt_cli.errors import ConvertError
from minigpt_cli.fileio import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save it
EOT = "<|endoftext|>"
CHAR_UNK = "<unk>"
EXPORTABLE = ("exportable tokenizers: byte, char, tiktoken, and sentencepiece models with "
              "identity normalization and no dummy prefix (as minigpt trains them)")
# A text to check every conversion on: scripts, accents, emoji, digits, whitespace runs,
# contractions, special-token text and the byte-fallback/control spellings.
PROBE = ("Hello, world! It's 2024: we'll pay $1,234.56 (or 12345678) for naïve café. "
         "Ünïcödé — “quotes” ‘too’ … e\u0301 ﬁ Straße ΑΒΓ αβγ Привет мир! שלום مرحبا "
         "नमस्ते 你好，世界。こんにちは 안녕하세요 🙂👍🏽 🇫🇷 \U0001f600\u200d\n"
         "  two  spaces,\ttab\t\tand\r\nCRLF\n\n\n   \n trailing   \n"
         "<|endoftext|> <unk> <|unk|> <0x41> <s></s> ▁x▁ ''' 'S 'LL ...\n   ")


# ---- shared helpers ---------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_chars(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def _to_bytes(token: str) -> bytes | None:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ConvertError("the 'tokenizers' package is needed to write Hugging Face "
                           "tokenizer files", "pip install tokenizers") from e
    return tokenizers


def _special(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False,
                      single_word=False)


# ---- minigpt -> Hugging Face ------------------------------------------------------------------

def save_hf_tokenizer(tokenizer, out_dir: Path, model_max_length: int,
                      chat_template: str | None = None) -> None:
    """Write Hugging Face tokenizer files for ``tokenizer`` into ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then encodes any text (with
    ``add_special_tokens=False``) to the ids ``tokenizer.encode`` gives, special-token text
    included (except control/byte-piece spellings with sentencepiece unigram models: see
    the module docstring), and decodes ordinary ids to the same text. The tokenizer's
    added special tokens (a chat template's) are special tokens to transformers too, and
    then ``split_special_tokens`` is off, so that they are split out of the text that
    ``apply_chat_template`` renders: with ``chat_template`` it gives minigpt's ids. Raises
    :class:`ConvertError` for a tokenizer that cannot be represented exactly; nothing is
    written then.
    """
    from minigpt_tokenizers.byte import ByteTokenizer
    from minigpt_tokenizers.char import CharTokenizer
    from minigpt_tokenizers.sentencepiece_model import SentencePieceTokenizer
    from minigpt_tokenizers.tiktoken_bpe import TiktokenTokenizer

    _import_tokenizers()
    extra_files: dict[str, str] = {}
    unk, spelled = None, ()
    if isinstance(tokenizer, TiktokenTokenizer):
        backend, extra_files = _tiktoken_backend(tokenizer)
        eot = EOT
    elif isinstance(tokenizer, ByteTokenizer):
        backend, eot = _byte_backend(tokenizer), EOT
    elif isinstance(tokenizer, CharTokenizer):
        backend, eot, unk = _char_backend(tokenizer), EOT, CHAR_UNK
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend, eot, unk, spelled = _sentencepiece_backend(tokenizer)
    else:
        raise ConvertError(f"the {getattr(tokenizer, 'spec', type(tokenizer).__name__)} "
                           "tokenizer cannot be written as a Hugging Face tokenizer", EXPORTABLE)
    assert backend.token_to_id(eot) == tokenizer.eot_id, (eot, tokenizer.eot_id)
    _check_same_ids(tokenizer, backend, spelled)
    chat_tokens = _add_chat_tokens(tokenizer, backend)

    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    token_map = {"bos_token": eot, "eos_token": eot, "unk_token": unk or eot}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        **token_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        # minigpt encodes special-token text as plain text; transformers then does too, but
        # a chat template's tokens must be matched in apply_chat_template's text
        "split_special_tokens": not chat_tokens,
        "added_tokens_decoder": {
            str(i): {"content": content, "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": True}
            for content, i in sorted(specials.items(), key=lambda kv: kv[1])},
    }
    if chat_template:
        config["chat_template"] = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / TOKENIZER_FILE, backend.to_str(pretty=False) + "\n")
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / SPECIAL_MAP_FILE, json.dumps(token_map, indent=2) + "\n")
    for name, text in extra_files.items():
        atomic_write_text(out_dir / name, text)


def _add_chat_tokens(tokenizer, backend) -> dict[str, int]:
    """The tokenizer's added special tokens as special tokens of ``backend``, same ids."""
    added = dict(sorted(tokenizer.added_tokens.items(), key=lambda kv: kv[1]))
    for content, i in added.items():
        if backend.get_vocab_size(with_added_tokens=True) != i:
            raise ConvertError(f"the special token {content!r} (id {i}) cannot keep its id in "
                               "a Hugging Face tokenizer", EXPORTABLE)
        backend.add_special_tokens([_special(content)])
        assert backend.token_to_id(content) == i, (content, i)
    return added


def _check_same_ids(tokenizer, backend, spelled: tuple[str, ...] = ()) -> None:
    """Refuse a conversion that gives other ids than minigpt on the probe text (less the
    ``spelled`` strings: pieces a Unigram model matches that sentencepiece does not)."""
    probe = PROBE
    for s in sorted(spelled, key=len, reverse=True):
        probe = probe.replace(s, "")
    backend.encode_special_tokens = True
    try:
        for text in (probe, probe.replace("\n", " "), " " + probe.strip()):
            ours = tokenizer.encode(text)
            theirs = backend.encode(text, add_special_tokens=False).ids
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False))
                           if a != b), min(len(ours), len(theirs)))
                raise ConvertError(
                    f"the {tokenizer.spec} tokenizer cannot be converted exactly: the Hugging "
                    f"Face version gives other ids (first difference at token {at})",
                    EXPORTABLE)
    finally:
        backend.encode_special_tokens = False


def _byte_level_pre_tokenizer(pattern: str | None):
    """GPT-2's regex is ByteLevel's own; other patterns are a Split, then ByteLevel."""
    from minigpt_tokenizers.tiktoken_bpe import R50K_PAT
    from tokenizers import Regex, pre_tokenizers

    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern == R50K_PAT:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # Oniguruma (tokenizers' regex engine) reads "{1,3}+" as "({1,3})+", not as possessive;
    # a bounded repeat at the end of an alternative matches the same either way.
    onig = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)
    try:
        split = pre_tokenizers.Split(Regex(onig), behavior="isolated", invert=False)
    except Exception as e:  # the Rust error for a pattern Oniguruma cannot compile
        raise ConvertError(f"the split pattern {pattern[:40]!r}... cannot be used by the "
                           f"Hugging Face tokenizers library ({e})", EXPORTABLE) from e
    return pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]],
                        pattern: str | None, specials: dict[str, int], ignore_merges: bool):
    from tokenizers.models import BPE

    from tokenizers import Tokenizer, decoders, processors

    vocab = {**vocab, **specials}  # specials in the model keep their ids when ids have gaps
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                            ignore_merges=ignore_merges))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pattern)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([_special(s) for s in sorted(specials, key=specials.get)])
    return backend


def _tiktoken_backend(tokenizer) -> tuple[Any, dict[str, str]]:
    from minigpt_tokenizers.tiktoken_bpe import R50K_PAT

    enc = tokenizer.enc
    ranks: dict[bytes, int] = enc._mergeable_ranks
    specials: dict[str, int] = dict(enc._special_tokens)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ConvertError(f"the {tokenizer.spec} ranks lack {len(missing)} single-byte "
                           "tokens, which a byte-level BPE needs", EXPORTABLE)
    clash = set(specials.values()) & set(ranks.values())
    if clash:
        raise ConvertError(f"the {tokenizer.spec} special tokens reuse rank ids "
                           f"({sorted(clash)[:3]})", EXPORTABLE)
    vocab = {_to_chars(token): rank for token, rank in ranks.items()}
    merges = _all_split_merges(ranks)
    backend = _byte_level_backend(vocab, merges, enc._pat_str, specials, ignore_merges=True)
    extra: dict[str, str] = {}
    if enc._pat_str == R50K_PAT:  # GPT-2's own vocab.json + merges.txt
        canonical = _canonical_merges(ranks)
        if canonical is not None:
            full = dict(sorted({**vocab, **specials}.items(), key=lambda kv: kv[1]))
            extra[VOCAB_FILE] = json.dumps(full, ensure_ascii=False) + "\n"
            extra[MERGES_FILE] = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in canonical)
    return backend, extra


def _all_split_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens that concatenates to a token, by the result's rank:
    tiktoken merges any such pair, lowest rank first."""
    found = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(_to_chars(left), _to_chars(right)) for *_, left, right in found]


def _canonical_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]] | None:
    """One merge per multi-byte token, as GPT-2's merges.txt has them: the two parts that
    tiktoken's merging of the token's bytes, with lower ranks only, ends with."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return None
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((_to_chars(parts[0]), _to_chars(parts[1])))
    return merges


def _byte_backend(tokenizer):
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    return _byte_level_backend(vocab, [], None, {EOT: tokenizer.eot_id}, ignore_merges=False)


def _char_backend(tokenizer):
    from tokenizers.models import BPE

    from tokenizers import Tokenizer, decoders

    if any(0xD800 <= ord(c) <= 0xDFFF for c in tokenizer.chars):
        raise ConvertError("the char vocabulary holds lone surrogates, which Hugging Face "
                           "tokenizer files cannot store", EXPORTABLE)
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    vocab[CHAR_UNK], vocab[EOT] = tokenizer.unk_id, tokenizer.eot_id
    # A BPE with no merges and no pre-tokenizer: one token per character, unk for others
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=CHAR_UNK, fuse_unk=False))
    backend.decoder = decoders.Sequence([decoders.Replace(CHAR_UNK, "\ufffd"), decoders.Fuse()])
    backend.add_special_tokens([_special(CHAR_UNK), _special(EOT)])
    return backend


# ---- sentencepiece ----------------------------------------------------------------------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _proto_fields(data: bytes):
    """(field number, value) pairs of a serialized protobuf message (no schema needed)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


# sentencepiece_model.proto: piece types, and the fields read here
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE_TYPE = 1, 2


def _read_sentencepiece_proto(data: bytes) -> dict[str, Any]:
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for field, value in _proto_fields(data):
        if field == 1:
            piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
            piece.update(_proto_fields(value))
            pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0],
                           piece[3]))
        elif field == 2:
            trainer.update(_proto_fields(value))
        elif field == 3:
            normalizer.update(_proto_fields(value))
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, UNIGRAM),
        "byte_fallback": bool(trainer.get(35, 0)),
        "normalizer": normalizer.get(1, b"").decode(),
        "charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def _onig_literal(text: str) -> str:
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _sentencepiece_backend(tokenizer) -> tuple[Any, str, str, tuple[str, ...]]:
    from tokenizers.models import BPE, Unigram

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    sp = tokenizer.sp
    try:
        proto = _read_sentencepiece_proto(sp.serialized_model_proto())
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise ConvertError(f"the {tokenizer.spec} model cannot be read for export") from e
    spec = tokenizer.spec
    if proto["model_type"] not in (UNIGRAM, BPE_TYPE):
        raise ConvertError(f"the {spec} model is a word or char sentencepiece model; only "
                           "unigram and bpe models can be exported", EXPORTABLE)
    if proto["charsmap"] or proto["normalizer"] not in ("identity", ""):
        raise ConvertError(f"the {spec} model normalizes text ({proto['normalizer']}), which "
                           "the export cannot reproduce exactly", EXPORTABLE)
    if proto["add_dummy_prefix"] or proto["remove_extra_whitespaces"]:
        raise ConvertError(f"the {spec} model adds a dummy prefix or removes extra spaces, "
                           "which the export cannot reproduce exactly", EXPORTABLE)
    pieces = proto["pieces"]
    assert len(pieces) == tokenizer.vocab_size
    unk_id = sp.unk_id()
    if proto["model_type"] == UNIGRAM:
        model = Unigram([(p, score) for p, score, _ in pieces], unk_id=unk_id,
                        byte_fallback=proto["byte_fallback"])
    else:
        normal = {p: (score, i) for i, (p, score, kind) in enumerate(pieces) if kind == NORMAL}
        ranked = [(-normal[p][0], normal[p][1], p[:k], p[k:]) for p in normal
                  for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = BPE(vocab={p: i for i, (p, _, _) in enumerate(pieces)}, merges=merges,
                    unk_token=pieces[unk_id][0], fuse_unk=True,
                    byte_fallback=proto["byte_fallback"], ignore_merges=False)
    backend = Tokenizer(model)
    if proto["escape_whitespaces"]:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    # User-defined pieces are always emitted whole; minigpt also encodes line by line.
    atomic = {p for p, _, kind in pieces if kind == USER_DEFINED}
    if tokenizer._newline_id is not None:
        atomic.add("\n")
    if atomic:
        pattern = "|".join(_onig_literal(p) for p in sorted(atomic, key=lambda p: (-len(p), p)))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("\u2581", " ")] if proto["escape_whitespaces"] else []
    if proto["byte_fallback"]:
        steps.append(decoders.ByteFallback())
    backend.decoder = decoders.Sequence([*steps, decoders.Fuse()])
    backend.add_special_tokens([_special(p) for i, (p, _, kind) in enumerate(pieces)
                                if kind in (CONTROL, UNKNOWN)])
    # The Unigram model of tokenizers matches every piece, so text that spells a control or
    # byte piece ("<|endoftext|>", "<0x41>") gives that piece there, not sentencepiece's ids.
    spelled = tuple(p for p, _, kind in pieces if kind in (CONTROL, UNKNOWN, BYTE, UNUSED)) \
        if proto["model_type"] == UNIGRAM else ()
    return backend, pieces[tokenizer.eot_id][0], pieces[unk_id][0], spelled


# ---- Hugging Face -> minigpt ------------------------------------------------------------------

LOAD_HINT = "a GPT-2-family tokenizer is needed: tokenizer.json with a byte-level BPE, " \
            "or vocab.json + merges.txt"


def load_hf_tokenizer(folder: Path):
    """minigpt's tiktoken tokenizer equal to the GPT-2-family tokenizer in ``folder``.

    Reads ``tokenizer.json`` (a byte-level BPE model) or else ``vocab.json`` +
    ``merges.txt``, with no network. Each token's id must be its BPE rank (merges in the
    order of the ids they make), every byte a token, and added tokens special. Special
    tokens keep their ids; minigpt encodes their text as plain text, as transformers does with
    ``split_special_tokens=True``. Those after end-of-text (a chat template's, in minigpt's
    own exports) become the tokenizer's added special tokens, where chat templates find
    them. Raises :class:`ConvertError` for anything else.
    """
    folder = Path(folder)
    specials = _named_specials(folder)
    if (folder / TOKENIZER_FILE).is_file():
        try:
            vocab, merges, pattern, added = _read_tokenizer_json(folder / TOKENIZER_FILE)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConvertError):
                raise
            raise ConvertError(f"{folder / TOKENIZER_FILE} is malformed "
                               f"({type(e).__name__}: {e})", LOAD_HINT) from e
    elif (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
        vocab, merges, added = _read_vocab_merges(folder)
        pattern = "gpt2"
    elif not folder.is_dir():
        raise ConvertError(f"{folder} is not a folder", LOAD_HINT)
    else:
        have = sorted(p.name for p in folder.iterdir())
        listed = ", ".join(have[:8]) + (", ..." if len(have) > 8 else "") or "nothing"
        raise ConvertError(f"{folder} has no tokenizer files (it has {listed})", LOAD_HINT)
    return _tiktoken_from_bpe(folder, vocab, merges, pattern, added, specials)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is not readable JSON", LOAD_HINT) from e


def _named_specials(folder: Path) -> set[str]:
    """Special-token names from tokenizer_config.json and special_tokens_map.json."""
    names = {EOT}
    for name in (CONFIG_FILE, SPECIAL_MAP_FILE):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            continue
        values = [v for k, v in data.items() if k.endswith("_token") or k.endswith("_tokens")]
        for entry in (data.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and entry.get("special"):
                values.append(entry)
        for v in values:
            for item in v if isinstance(v, list) else [v]:
                content = item.get("content") if isinstance(item, dict) else item
                if isinstance(content, str):
                    names.add(content)
    return names


def _merge_pairs(raw: list, where: Path) -> list[tuple[str, str]]:
    merges = []
    for m in raw:
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise ConvertError(f"{where} has a malformed merge {str(m)[:40]!r}", LOAD_HINT)
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer_json(path: Path):
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind is None and isinstance(model, dict) and "merges" in model:
        kind = "BPE"
    if kind != "BPE":
        raise ConvertError(f"{path} holds {f'a {kind}' if kind else 'no known'} model, "
                           "not a BPE", LOAD_HINT)
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        raise ConvertError(f"{path} is a BPE with options tiktoken cannot carry "
                           "(byte fallback, subword prefix/suffix or dropout)", LOAD_HINT)
    if data.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        kind = data["normalizer"].get("type") if isinstance(data["normalizer"], dict) else "?"
        raise ConvertError(f"{path} normalizes text ({kind}), which tiktoken cannot carry",
                           LOAD_HINT)
    pattern = _byte_level_pattern(data.get("pre_tokenizer"), path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ConvertError(f"{path} has no BPE vocabulary", LOAD_HINT)
    merges = _merge_pairs(model.get("merges") or [], path)
    added = {}
    for t in data.get("added_tokens") or []:
        if not t.get("special"):
            raise ConvertError(f"{path} has a non-special added token {t.get('content')!r}, "
                               "which tiktoken cannot carry", LOAD_HINT)
        added[t["content"]] = int(t["id"])
    return vocab, merges, pattern, added


def _byte_level_pattern(pre: Any, path: Path) -> str | None:
    """'gpt2' for ByteLevel's own regex, a Split's pattern, or None for no splitting."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) \
        and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    last = steps[-1] if steps else None
    if not kinds or kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise ConvertError(f"{path} is not a byte-level BPE without a prefix space "
                           f"(pre-tokenizer: {' + '.join(map(str, kinds))})", LOAD_HINT)
    use_regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"]:
        return "gpt2" if use_regex else None
    split = steps[0]
    regex = (split.get("pattern") or {}).get("Regex")
    if (kinds == ["Split", "ByteLevel"] and not use_regex and isinstance(regex, str)
            and str(split.get("behavior")).lower() == "isolated" and not split.get("invert")):
        return regex
    raise ConvertError(f"{path} has a pre-tokenizer tiktoken cannot reproduce "
                       f"({' + '.join(map(str, kinds))})", LOAD_HINT)


def _read_vocab_merges(folder: Path):
    vocab = _read_json(folder / VOCAB_FILE)
    if not isinstance(vocab, dict):
        raise ConvertError(f"{folder / VOCAB_FILE} is not a token -> id mapping", LOAD_HINT)
    try:
        lines = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{folder / MERGES_FILE} is not readable", LOAD_HINT) from e
    raw = [ln for ln in lines if ln and not ln.startswith("#version")]
    added = {}
    path = folder / "added_tokens.json"
    if path.is_file():
        extra = _read_json(path)
        added = {str(k): int(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
    return vocab, _merge_pairs(raw, folder / MERGES_FILE), added


def _tiktoken_from_bpe(folder: Path, vocab: dict, merges: list[tuple[str, str]],
                       pattern: str | None, added: dict[str, int], named: set[str]):
    from minigpt_tokenizers.tiktoken_bpe import KNOWN_RANKS, R50K_PAT, TiktokenTokenizer

    specials = dict(added)
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if not isinstance(i, int):
            raise ConvertError(f"{folder}: token {token!r} has a non-integer id", LOAD_HINT)
        if token in specials or token in named:
            if specials.setdefault(token, i) != i:
                raise ConvertError(f"{folder}: special token {token!r} has two ids", LOAD_HINT)
            continue
        raw = _to_bytes(token)
        if raw is None:
            raise ConvertError(f"{folder}: token {token!r} (id {i}) is not a byte-level token "
                               "and not special", LOAD_HINT)
        if ranks.setdefault(raw, i) != i:
            raise ConvertError(f"{folder}: two tokens spell the same bytes", LOAD_HINT)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ConvertError(f"{folder}: {len(missing)} of the 256 bytes are not tokens "
                           "(a byte-level BPE needs all of them)", LOAD_HINT)
    ids = list(ranks.values()) + list(specials.values())
    if len(set(ids)) != len(ids):
        raise ConvertError(f"{folder}: token ids are not unique", LOAD_HINT)
    _check_ids_are_ranks(folder, ranks, merges, pattern)

    if pattern == "gpt2":
        pattern = R50K_PAT
    elif pattern is None:
        pattern = R50K_PAT  # no splitting, and (checked above) no merges: any split will do
    data = b"".join(base64.b64encode(tok) + b" %d\n" % rank
                    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    known = KNOWN_RANKS.get(hashlib.sha256(data).hexdigest())
    if known is not None and known[1] == pattern and specials.get(EOT) == known[2].get(EOT):
        name = known[0]
        spec = "tiktoken:gpt2" if name == "r50k_base" else f"tiktoken:{name}"
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name) or "hf"
        spec = f"tiktoken:hf-{name}"
    added = _trailing_specials(ranks, specials)
    tok = TiktokenTokenizer.from_ranks(spec, name, ranks, pattern,
                                       {t: i for t, i in specials.items() if t not in added})
    ids = tok.add_special_tokens(added)
    assert ids == [specials[t] for t in added], (added, ids)
    _check_against_hf(folder, tok)
    return tok


def _trailing_specials(ranks: dict[bytes, int], specials: dict[str, int]) -> list[str]:
    """The special tokens whose ids follow end-of-text and every rank without a gap, in id
    order (a chat template's tokens, as minigpt exports them); else none."""
    if EOT not in specials:
        return []
    last = max(specials[EOT], *ranks.values())
    after = sorted((i, t) for t, i in specials.items() if i > last)
    if [i for i, _ in after] != list(range(last + 1, last + 1 + len(after))):
        return []
    return [t for _, t in after]


def folder_chat_template(folder: Path) -> str | None:
    """The Jinja chat template of a Hugging Face folder (``tokenizer_config.json``'s
    ``chat_template``, or ``chat_template.jinja``), or None."""
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        try:
            template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{folder / CHAT_TEMPLATE_FILE} is not readable") from e
    return template if isinstance(template, str) else None


def _check_ids_are_ranks(folder: Path, ranks: dict[bytes, int],
                         merges: list[tuple[str, str]], pattern: str | None) -> None:
    """tiktoken merges by the rank of the result: the merges must make tokens in id order,
    and make every multi-byte token."""
    made, last = set(), -1
    for a, b in merges:
        left, right = _to_bytes(a), _to_bytes(b)
        both = None if left is None or right is None else left + right
        i = ranks.get(both) if both is not None else None
        if i is None or left not in ranks or right not in ranks:
            raise ConvertError(f"{folder}: the merge {a!r} + {b!r} does not make a token",
                               LOAD_HINT)
        if i < last:
            raise ConvertError(f"{folder}: token ids are not BPE ranks (the merge {a!r} + "
                               f"{b!r} makes id {i} after id {last})", LOAD_HINT)
        last = i
        made.add(both)
    unmade = [t for t in ranks if len(t) > 1 and t not in made]
    if unmade:
        raise ConvertError(f"{folder}: {len(unmade)} tokens are made by no merge "
                           f"(e.g. {_to_chars(unmade[0])!r}), so ids are not BPE ranks",
                           LOAD_HINT)
    if pattern is None and merges:
        raise ConvertError(f"{folder}: a BPE with merges but no split pattern cannot be "
                           "carried by tiktoken", LOAD_HINT)


def _check_against_hf(folder: Path, tok) -> None:
    """With the tokenizers library installed, compare ids with the folder's own tokenizer."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return
    from tokenizers.models import BPE

    from tokenizers import Tokenizer, decoders, pre_tokenizers

    try:
        if (folder / TOKENIZER_FILE).is_file():
            hf = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        else:
            hf = Tokenizer(BPE.from_file(str(folder / VOCAB_FILE), str(folder / MERGES_FILE)))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
    except Exception as e:  # the Rust error for a file it cannot parse
        raise ConvertError(f"{folder}: the tokenizer files cannot be read ({e})",
                           LOAD_HINT) from e
    hf.encode_special_tokens = True
    if hf.encode(PROBE, add_special_tokens=False).ids != tok.encode(PROBE):
        raise ConvertError(f"{folder}: the tokenizer does not encode like a byte-level BPE "
                           "whose ids are ranks", LOAD_HINT)

"""Streamed text: whole characters only, for every built-in tokenizer, and stop strings."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.generate import engine
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine, GenerationResult, TextDelta
from minigpt_cli.generate.text import StopFilter, TextStream

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
TEXT = "héllo wörld 👋🏽 世界、こんにちは ok\n¡ñ! 🎉 漢字"
# Training text for the tokenizers that learn a vocabulary. It lacks 🏽 and 字, so
# sentencepiece spells those with byte-fallback pieces, one byte each.
TRAINING_TEXT = ("héllo wörld 👋 世界 こんにちは 🎉 ok. The quick brown fox jumps over it.\n"
                 "Hello world, 世界は広い。こんにちは、元気ですか? 🎉🎉 ñandú ¡hola! 漢\n") * 20
TOKENIZERS = ["byte", "char", "tiktoken", "sentencepiece"]


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread is fastest


@pytest.fixture(scope="module")
def gpt2_tok():
    ranks = SHARED / "tokenizers" / "gpt2.tiktoken"
    if not ranks.is_file():
        pytest.skip(f"{ranks} not found (set MINIGPT_SHARED_DIR)")
    return minigpt_tokenizers.create(f"tiktoken:{ranks}")


@pytest.fixture(scope="module")
def char_tok():
    return minigpt_tokenizers.create("char", lambda: [TRAINING_TEXT + TEXT])


@pytest.fixture(scope="module")
def sp_tok():
    return minigpt_tokenizers.create("sentencepiece:bpe:400", lambda: [TRAINING_TEXT])


@pytest.fixture
def tokenizer(request):
    """The built-in tokenizer named by the test's ``name`` parameter."""
    fixture = {"byte": "byte_tok", "char": "char_tok", "tiktoken": "gpt2_tok",
               "sentencepiece": "sp_tok"}[request.getfixturevalue("name")]
    return request.getfixturevalue(fixture)


class DecodeOnly:
    """A tokenizer without decode_bytes: the stream falls back to decoding again."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids)


def stream_pieces(tok, ids) -> list[str]:
    stream = TextStream(tok)
    return [stream.push(i) for i in ids] + [stream.flush()]


def split_points(tok, ids) -> list[int]:
    """Where the tokens cut a character in two: the decode of the first n ends in U+FFFD."""
    return [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_never_splits_characters(name, tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    for t in (tokenizer, DecodeOnly(tokenizer)):
        pieces = stream_pieces(t, ids)
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in p for p in pieces)  # no character was ever split
    if name != "char":  # the test means something: some characters do span tokens
        assert split_points(tokenizer, ids)


def test_stream_waits_for_the_last_byte(byte_tok):
    assert stream_pieces(byte_tok, byte_tok.encode("👋")) == ["", "", "", "👋", ""]


def test_sentencepiece_spells_unseen_characters_with_byte_pieces(sp_tok):
    ids = sp_tok.encode("🏽字")
    assert len(ids) == 7 and all(sp_tok.sp.is_byte(i) for i in ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_equals_decode_for_arbitrary_tokens(name, tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids = [i for i in ids if i != tokenizer.eot_id]  # it ends a sample, never streamed
        for t in (tokenizer, DecodeOnly(tokenizer)):
            assert "".join(stream_pieces(t, ids)) == tokenizer.decode(ids), ids


def test_invalid_bytes_become_replacement_characters(byte_tok):
    assert stream_pieces(byte_tok, [0xFF, 0x41]) == ["\ufffd", "A", ""]
    assert "".join(stream_pieces(byte_tok, [0x41, 0xF0, 0x9F])) == "A\ufffd"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_engine_streams_text_as_soon_as_it_is_whole(name, tokenizer, monkeypatch, toy_gpt):
    """Through the engine, token by token: before each new token is sampled, the text
    streamed so far is exactly the decode of the tokens so far, less a character still
    missing bytes; never a U+FFFD; in the end, the decode of the whole sequence."""
    ids = tokenizer.encode(TEXT)
    script = iter([*ids, tokenizer.eot_id])
    shown: list[str] = []
    sampled = 0

    def fake_sample_next(logits, settings, generator=None, recent=None):
        nonlocal sampled
        assert "".join(shown) == tokenizer.decode(ids[:sampled]).rstrip("\ufffd"), sampled
        sampled += 1
        return torch.full((logits.size(0),), next(script), dtype=torch.long)

    monkeypatch.setattr(engine, "sample_next", fake_sample_next)
    settings = SamplingSettings(max_new_tokens=len(ids) + 5)
    model = toy_gpt(vocab_size=tokenizer.vocab_size)
    for event in Engine(model, tokenizer).generate("o", settings):
        if isinstance(event, TextDelta):
            assert "\ufffd" not in event.text
            shown.append(event.text)
        elif isinstance(event, GenerationResult):
            result = event
    assert sampled == len(ids) + 1 and result.samples[0].finish_reason == "eot"
    assert "".join(shown) == result.samples[0].text == tokenizer.decode(ids) == TEXT
    assert result.samples[0].tokens == ids


class DummyPrefix:
    """Decodes like SentencePiece with a dummy prefix: the text's leading space is dropped."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids).removeprefix(" ")

    def decode_bytes(self, ids):
        return self.tok.decode_bytes(ids)


def test_stream_follows_a_decoder_that_treats_the_first_token_specially(byte_tok):
    tok = DummyPrefix(byte_tok)
    ids = byte_tok.encode(" a b 世")
    assert "".join(stream_pieces(tok, ids)) == tok.decode(ids) == "a b 世"


def test_stop_filter_holds_back_a_possible_start():
    f = StopFilter(["END", "\n\n"])
    assert f.push("abc E") == ("abc ", False)
    assert f.push("N") == ("", False)
    assert f.push("x\n") == ("ENx", False)
    assert f.push("\nrest") == ("", True)
    g = StopFilter(["ab", "b"])
    assert g.push("xab") == ("x", True)  # the earliest stop string wins


@pytest.mark.parametrize("pieces, expected", [
    (["\n\nThe ", "end.\n\nMore"], ("\n\nThe end.", True)),  # a blank stop before the text
    (["\n", "\n", "Hi\n", "\nthere"], ("\n\nHi", True)),
    (["\nUser: hi"], ("", True)),  # a visible stop counts from the start
    ([" \n", "\n"], (" \n\n", False)),  # nothing visible yet: no stop
])
def test_a_reply_stops_at_a_blank_stop_only_after_its_text(pieces, expected):
    f = StopFilter(["\n\n", "\nUser:"], reply=True)
    out, stopped = "", False
    for p in pieces:
        text, stopped = f.push(p)
        out += text
        if stopped:
            break
    assert (out + ("" if stopped else f.flush()), stopped) == expected
    plain = StopFilter(["\n\n"])  # not a reply: a stop is a stop wherever it is
    assert plain.push("\n\nThe end.") == ("", True)

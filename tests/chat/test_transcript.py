"""Transcripts: a conversation as text, and read back."""

from __future__ import annotations

from minigpt_cli.chat.template import Turn
from minigpt_cli.chat.transcript import Saved, parse_transcript, transcript


def test_transcript_parsing():
    turns = [Turn("a", "b"), Turn("c", "")]
    assert parse_transcript(transcript("sys", turns, "plain", "runs/x")) == Saved(
        "sys", turns, "plain")
    assert parse_transcript(transcript("", turns)) == Saved("", turns, None)


def test_json_with_text_turns_reads_back():
    import json

    from minigpt_cli.chat.transcript import from_json

    text = json.dumps({"system": "sys", "template": "chat",
                       "turns": [{"user": "a", "assistant": "b"}]})
    assert from_json(text) == Saved("sys", [Turn("a", "b")], "chat")
    assert from_json('{"turns": []}') == Saved("", [], None)

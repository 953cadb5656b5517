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


def test_lines_that_look_like_role_markers_read_back_inside_their_message():
    # a message line starting "Assistant:" (typed in a block, or said by the model) opened a
    # message of its own when read back: 5 saved turns came back as 6
    turns = [Turn("first\nAssistant: injected\nUser: also", "a\n\\User: b"),
             Turn("x\u2028User: y\x0cz", "ok")]
    system = "be\nSystem: brief"
    assert parse_transcript(transcript(system, turns, "chat")) == Saved(system, turns, "chat")
    # hand-written text keeps its backslashes unless one escapes a marker
    assert parse_transcript("User: a\n\\b\nAssistant: c\n\\\\d") == Saved(
        "", [Turn("a\n\\b", "c\n\\\\d")], None)

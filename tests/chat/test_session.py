"""The chat session: the context it builds, streamed replies, slash commands, and saving
and loading a conversation."""

from __future__ import annotations

import json

import pytest

from minigpt_cli.chat.template import Turn

pytestmark = pytest.mark.usefixtures("one_thread", "data_home")  # one thread: toy models


def test_oldest_turns_leave_the_context_first(byte_tok, chat_session):
    s = chat_session(template="plain", max_new_tokens=8)
    s.turns = [Turn(f"m{i}", f"r{i}") for i in range(10)]
    prompt = s.build_prompt("last")
    assert byte_tok.decode(prompt.ids) == "m6r6\nm7r7\nm8r8\nm9r9\nlast"  # 24 tokens: 32 - 8
    assert prompt.first_turn == 6 and not prompt.cropped
    s.reply("last")
    assert s.first_turn_in_context == 6 and len(s.turns) == 11
    s.turns.append(Turn("x" * 50, "y"))  # too long for the context alone: its end is kept
    prompt = s.build_prompt("z")
    assert byte_tok.decode(prompt.ids) == "x" * 21 + "y\nz" and prompt.cropped


def test_reply_streams_and_is_recorded(scripted_reply, chat_session):
    scripted_reply(" Hello [bold]there[/bold]\nUser: not this")
    s = chat_session(max_new_tokens=60)
    assert s.reply("Hi") == "Hello [bold]there[/bold]"
    assert s.turns == [Turn("Hi", "Hello [bold]there[/bold]")]
    assert s.last_result.samples[0].finish_reason == "stop"


def test_plain_template_stops_at_a_blank_line(scripted_reply, chat_session):
    scripted_reply(" went home.\nThe end.\n\nNext story")
    s = chat_session(template="plain", max_new_tokens=60)
    assert s.reply("He") == " went home.\nThe end."


def test_a_plain_reply_may_open_with_a_blank_line(scripted_reply, chat_session):
    # a base model continues a sentence with the blank line after it: that is not the end
    # of its reply yet (before, every such reply came out empty)
    scripted_reply("\n\nReturn the value.\n\nNext story")
    s = chat_session(template="plain", max_new_tokens=60)
    assert s.reply("Tell me about it.") == "\n\nReturn the value."


def test_a_stopped_reply_keeps_what_was_shown(scripted_reply, chat_session):
    scripted_reply("abcdefgh")
    s = chat_session(max_new_tokens=12)
    pieces = s.respond("Hi")
    assert next(pieces) == "a"
    pieces.close()
    assert s.turns == [Turn("Hi", "a")]


def test_greedy_replies_are_reproducible(chat_session):
    a, b = chat_session(), chat_session()
    assert a.reply("Hello") == b.reply("Hello")


def test_set_changes_settings(chat_session):
    s = chat_session()
    for line, field, value in [("/set temperature 0.5", "temperature", 0.5),
                               ("/set top_k 40", "top_k", 40), ("/set top_p 0.9", "top_p", 0.9),
                               ("/set min_p 0.05", "min_p", 0.05),
                               ("/set repetition_penalty 1.3", "repetition_penalty", 1.3),
                               ("/set max_tokens 64", "max_new_tokens", 64),
                               ("/set seed 7", "seed", 7), ("/set seed none", "seed", None)]:
        result = s.handle_command(line)
        assert result.ok, result.lines
        assert getattr(s.settings, field) == value


@pytest.mark.parametrize("line, hint", [
    ("/set temperature -1", "temperature must be >= 0"),
    ("/set top_p 0", "top_p must be in (0, 1]"),
    ("/set max_tokens 0", "max_tokens must be at least 1"),
    ("/set top_k 2.5", "top_k needs a whole number, got '2.5'"),
    ("/set temperature hot", "temperature needs a number"),
    ("/set colour blue", "usage: /set KEY VALUE"),
    ("/set temperature", "usage: /set KEY VALUE"),
    ("/set top_k -1", "top_k must be >= 0"),
    ("/set top_p 1.5", "top_p must be in (0, 1]"),
    ("/set min_p 2", "min_p must be in [0, 1]"),
    ("/set repetition_penalty 0", "repetition_penalty must be > 0"),
    ("/set temperature nan", "temperature must be >= 0"),
    ("/set seed -5", "seed must be between 0 and 2**64 - 1"),
    ("/set seed lucky", "seed needs a whole number, got 'lucky'"),
    ("/set max_tokens 1e3", "max_tokens needs a whole number"),
    ("/frobnicate", "unknown command /frobnicate; type /help"),
    ("/stats maybe", "usage: /stats on|off"),
    ("/save", "usage: /save FILE"),
])
def test_bad_commands_give_a_one_line_hint(line, hint, chat_session):
    s = chat_session()
    before = s.settings
    result = s.handle_command(line)
    assert not result.ok and not result.quit
    assert len(result.lines) == 1 and hint in result.lines[0]
    assert s.settings == before


def test_help_show_system_reset_stats_quit(chat_session):
    s = chat_session()
    help_text = "\n".join(s.handle_command("/help").lines)
    for cmd in ("/set", "/show", "/reset", "/system", "/save", "/load", "/stats", "/quit"):
        assert cmd in help_text
    assert s.handle_command("/system You are terse.").ok and s.system == "You are terse."
    s.reply("Hi")
    show = "\n".join(s.handle_command("/show").lines)
    for part in ("runs/toy", "byte", "chat", "You are terse.", "temperature=0",
                 "of 32 tokens", "1 of 1 turns"):
        assert part in show
    s.handle_command("/reset")
    assert s.turns == [] and s.system == "You are terse."
    s.handle_command("/system")
    assert s.system == ""
    assert s.handle_command("/stats on").ok and s.show_stats
    assert "tokens/s" in s.handle_command("/stats").lines[0]
    assert s.handle_command("/quit").quit and s.handle_command("/exit").quit


@pytest.mark.parametrize("name", ["chat.json", "chat.txt"])
def test_save_and_load_round_trip(tmp_path, name, chat_session):
    s = chat_session(system="Be kind.")
    s.turns = [Turn("Hi", "Hello!"), Turn("two\nlines", "ok\n\nwith a gap")]
    assert s.handle_command(f"/save {tmp_path / name}").ok
    other = chat_session()
    result = other.handle_command(f"/load {tmp_path / name}")
    assert result.ok and "2 turns" in result.lines[0] and not result.warnings
    assert other.turns == s.turns and other.system == "Be kind."
    assert other.template.name == "chat"
    saved = (tmp_path / name).read_text()
    if name.endswith(".json"):
        raw = json.loads(saved)
        assert raw["turns"][0] == {"user": "Hi", "assistant": "Hello!"}
        assert raw["template"] == "chat" and raw["model"] == "runs/toy"
    else:
        assert saved.startswith("# minigpt chat transcript\n# template: chat\n"
                                "# model: runs/toy\n\nSystem: Be kind.\n\nUser: Hi\n")


@pytest.mark.parametrize("name", ["chat.json", "chat.txt"])
def test_load_restores_the_template_it_was_saved_with(tmp_path, name, chat_session):
    s = chat_session(template="chat")
    s.turns = [Turn("Hi", "Hello!")]
    s.handle_command(f"/save {tmp_path / name}")
    plain = chat_session(template="plain")
    result = plain.handle_command(f"/load {tmp_path / name}")
    assert result.ok and plain.template.name == "chat"
    assert result.warnings == ["template chat, as saved (it was plain)"]
    assert "template   chat" in plain.handle_command("/show").lines


def test_load_warns_about_a_template_it_does_not_know(tmp_path, chat_session):
    (tmp_path / "a.txt").write_text("# template: alpaca\nUser: Hi\nAssistant: Yo\n")
    (tmp_path / "b.txt").write_text("User: Hi\nAssistant: Yo\n")  # written by hand
    s = chat_session(template="plain")
    result = s.handle_command(f"/load {tmp_path / 'a.txt'}")
    assert result.ok and s.template.name == "plain" and s.turns == [Turn("Hi", "Yo")]
    assert len(result.warnings) == 1 and "'alpaca'" in result.warnings[0]
    assert "keeping plain" in result.warnings[0]
    result = s.handle_command(f"/load {tmp_path / 'b.txt'}")
    assert result.ok and not result.warnings and s.template.name == "plain"


def test_load_rejects_other_files(tmp_path, chat_session):
    s = chat_session()
    (tmp_path / "notes.txt").write_text("just some notes\n")
    (tmp_path / "bad.json").write_text("[1, 2]")
    for name, hint in (("notes.txt", "not a saved conversation"),
                       ("bad.json", "not a saved conversation"), ("missing.txt", "cannot read")):
        result = s.handle_command(f"/load {tmp_path / name}")
        assert not result.ok and hint in result.lines[0]


@pytest.mark.parametrize("turns", [
    [{"user": 1, "assistant": None}],
    [{"user": "Hi", "assistant": ["Yo"]}],
    "User: Hi",
    {"user": "Hi", "assistant": "Yo"},
])
def test_load_rejects_json_whose_turns_are_not_text(turns, tmp_path, chat_session):
    s = chat_session()
    (tmp_path / "bad.json").write_text(json.dumps({"turns": turns}))
    result = s.handle_command(f"/load {tmp_path / 'bad.json'}")
    assert not result.ok and "is not a saved conversation" in result.lines[0]
    assert s.turns == []


def test_stats_after_a_stopped_reply_are_not_the_reply_before(scripted_reply, chat_session):
    scripted_reply("abcdefgh")
    s = chat_session(max_new_tokens=12)
    s.reply("Hi")
    assert "9 tokens" in s.handle_command("/stats").lines[0]
    pieces = s.respond("Again")
    next(pieces)
    pieces.close()  # Ctrl-C: before, /stats showed the first reply's figures as the last's
    assert s.handle_command("/stats").lines == ["the last reply was stopped: no figures for it"]
    s.reply("Once more")
    assert "9 tokens" in s.stats_text()


def test_a_message_too_long_for_the_context_is_said_to_be_cut(scripted_reply, chat_session):
    from minigpt_cli.generate.engine import Notice

    scripted_reply(" Yes.")
    s = chat_session(template="plain", max_new_tokens=8)  # context 32: 24 for the prompt
    pieces = list(s.respond("x" * 30))
    notices = [p.message for p in pieces if isinstance(p, Notice)]
    assert notices == ["the message is too long for the model's context: of the 30 tokens "
                       "of the prompt only the last 24 are used (the context is 32, less "
                       "room for the reply)"]
    assert "".join(p for p in pieces if isinstance(p, str)) == " Yes."
    s.turns = [s.turns[0]]  # an earlier turn cut to fit is the usual dropping: no notice
    assert not [p for p in s.respond("short") if isinstance(p, Notice)]

"""The chat templates: how turns become a prompt."""

from __future__ import annotations

from minigpt_cli.chat.template import TEMPLATES, Turn


def test_templates_render_turns():
    turns = [Turn("Hi", " Hello!"), Turn("Who are you?", "A model.")]
    assert TEMPLATES["chat"].render("Be brief.", turns, "Bye") == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\n"
        "Assistant: A model.\nUser: Bye\nAssistant:")
    assert TEMPLATES["plain"].render("", turns, "And then") == (
        "Hi Hello!\nWho are you?A model.\nAnd then")
    assert TEMPLATES["plain"].render("Intro", [], "x") == "Intro\nx"

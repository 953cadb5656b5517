"""Conversations on disk: a readable transcript (or JSON) that ``/load`` reads back."""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from minigpt_cli.chat.template import Turn

ROLES = ("System", "User", "Assistant")
# A line inside a message that would read as the start of one (``User: ...``), or as such a
# line escaped, is written with one more backslash in front, and read back with one less.
_ESCAPED = re.compile(r"\\*(?:System|User|Assistant):")


class Saved(NamedTuple):
    """A conversation read back from a file."""

    system: str
    turns: list[Turn]
    template: str | None  # None when the file does not say (e.g. written by hand)


def transcript(system: str, turns: list[Turn], template: str | None = None,
               model: str = "") -> str:
    """The conversation as text: ``# key: value`` header lines, then role-marked messages."""
    header = ["# minigpt chat transcript"]
    if template:
        header.append(f"# template: {template}")
    if model:
        header.append(f"# model: {model}")
    lines = ["\n".join(header) + "\n"]
    if system:
        lines.append(f"System: {_escape(system)}\n")
    for t in turns:
        lines.append(f"User: {_escape(t.user)}\nAssistant: {_escape(t.assistant.strip())}\n")
    return "\n".join(lines)


def _escape(message: str) -> str:
    first, *rest = message.split("\n")
    return "\n".join([first, *("\\" + line if _ESCAPED.match(line) else line
                                for line in rest)])


def parse_transcript(text: str) -> Saved:
    """Read back ``transcript``: a line starting with a role marker opens a message;
    ``# key: value`` lines before the first message are the header."""
    messages: list[list] = []
    header: dict[str, str] = {}
    for line in text.split("\n"):  # not splitlines(): a message may hold \f, \x1c, \u2028
        role = next((r for r in ROLES if line.startswith(f"{r}:")), None)
        if role:
            messages.append([role, line[len(role) + 1:].removeprefix(" ")])
        elif messages:
            if line.startswith("\\") and _ESCAPED.match(line):
                line = line[1:]
            messages[-1][1] += "\n" + line
        elif line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                header[key.strip().lower()] = value.strip()
        elif line.strip():
            raise ValueError("expected lines starting with System:, User: or Assistant:")
    system, turns = "", []
    for role, body in messages:
        body = body.strip()
        if role == "System":
            system = body
        elif role == "User":
            turns.append(Turn(body, ""))
        elif turns and not turns[-1].assistant:
            turns[-1].assistant = body
        else:
            raise ValueError("an Assistant: message without a User: message before it")
    return Saved(system, turns, header.get("template") or None)


def from_json(text: str) -> Saved:
    """What ``/save FILE.json`` wrote; anything else (turns that are not text, say) is a
    ``ValueError``."""
    expected = "expected JSON with 'turns' of 'user' and 'assistant'"
    try:
        raw = json.loads(text)
        system = raw.get("system") or ""
        turns = [Turn(t["user"], t["assistant"]) for t in raw["turns"]]
        template = raw.get("template")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(expected) from e
    texts = [system, *(text for t in turns for text in (t.user, t.assistant))]
    if not isinstance(raw["turns"], list) or not all(isinstance(t, str) for t in texts) \
            or not isinstance(template, str | None):
        raise ValueError(expected)
    return Saved(system, turns, template or None)

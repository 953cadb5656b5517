"""Chat templates: how a conversation becomes the text the model continues, and where its
reply ends. One definition serves the REPL, ``generate`` and, later, the server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class Template:
    """How turns become the text the model continues, and where its reply ends."""

    name: str
    stops: tuple[str, ...]

    def render(self, system: str, turns: list[Turn], message: str) -> str:
        if self.name == "chat":
            head = f"System: {system}\n" if system else ""
            body = "".join(f"User: {t.user}\nAssistant: {t.assistant.strip()}\n" for t in turns)
            return f"{head}{body}User: {message}\nAssistant:"
        # plain: the text itself; the model continues the user's message where it ends
        head = f"{system}\n" if system else ""
        return head + "".join(f"{t.user}{t.assistant.rstrip()}\n" for t in turns) + message


TEMPLATES = {
    "plain": Template("plain", stops=("\n\n",)),
    "chat": Template("chat", stops=("\nUser:", "\nAssistant:", "\nSystem:", "\n\n")),
}

"""The chat REPL's terminal side: the prompt-toolkit loop and the piped mode around a
:class:`~minigpt_cli.chat.session.ChatSession`.

``run_repl`` is the interactive loop, ``run_piped`` the scriptable one (one message per
input line, one reply per output block).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.text import Text

from minigpt_cli.chat.session import COMMANDS, SETTABLE, ChatSession, CommandResult
from minigpt_cli.cli.ui import StreamWriter
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.engine import Notice

HISTORY_FILE = "chat_history"


def _note(console: Console, line: str, ok: bool = True) -> None:
    console.print(Text(line, style="dim" if ok else "yellow"), soft_wrap=True)


def _show_result(console: Console, result: CommandResult, safe=lambda s: s) -> None:
    for line in result.lines:  # they may quote a loaded file (/show's system prompt)
        _note(console, safe(line), result.ok)
    for line in result.warnings:
        _note(console, safe(line), ok=False)


def _show_reply(session: ChatSession, message: str, console: Console, safe) -> None:
    pieces = session.respond(message)
    out = StreamWriter(console, safe)
    shown = False
    try:
        for piece in pieces:
            if isinstance(piece, Notice):
                out.flush()
                _note(console, piece.message, ok=False)
            else:
                text = piece if shown else piece.lstrip()  # no blank line before a reply
                if text:
                    out.write(text)
                    shown = True
        out.flush()
        if shown:
            console.out("")
        else:  # e.g. the model went straight to the next "User:"
            _note(console, "(empty reply)")
        if session.show_stats:
            _note(console, session.stats_text())
    except KeyboardInterrupt:
        pieces.close()
        out.flush()
        console.out("")
        _note(console, "(reply stopped)")


def _open_block(text: str) -> bool:
    """Whether ``text`` opens a triple-quoted message that is not closed yet."""
    text = text.strip()
    return text.startswith('"""') and not text.endswith('"""', 3)


def _unquote(text: str) -> str:
    """The message inside a triple-quoted block (closed or, at end of input, not)."""
    body = text.strip()[3:]
    return body.removesuffix('"""').strip("\n")


class SlashCompleter(Completer):
    """Tab completion for slash commands, /set keys, /stats values and /save, /load paths."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event):
        text = document.text_before_cursor.lstrip()
        if not text.startswith("/"):
            return
        if " " not in text:
            yield from _matches(text, COMMANDS)
            return
        command, _, rest = text.partition(" ")
        rest = rest.lstrip()
        if command in ("/save", "/load"):
            yield from self.paths.get_completions(Document(rest), complete_event)
        elif command == "/set" and " " not in rest:
            yield from _matches(rest, SETTABLE)
        elif command == "/stats":
            yield from _matches(rest, ("on", "off"))


def _matches(word: str, options: Iterable[str]) -> Iterator[Completion]:
    for option in options:
        if option.startswith(word.lower()):
            yield Completion(option, start_position=-len(word))


class _History(FileHistory):
    """The input history file; a file that cannot be read or written (a folder in its
    place, a full disk, its folder deleted) stops it, and ``problem`` says why, instead of
    prompt-toolkit's traceback on every prompt. The session goes on."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path
        self.problem: str | None = None

    def load_history_strings(self) -> Iterator[str]:
        try:
            strings = list(super().load_history_strings())
        except OSError as e:
            self._failed("read", e)
            strings = []
        yield from strings

    def store_string(self, string: str) -> None:
        if self.problem is not None:
            return
        try:
            super().store_string(string)
        except OSError as e:
            self._failed("write", e)

    def _failed(self, verb: str, e: OSError) -> None:
        self.problem = f"input history not saved: cannot {verb} {self.path} ({e.strerror or e})"


def _history(path: Path | None, console: Console):
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"), open(path, "rb"):  # (touching it would pass a folder)
            pass
    except OSError as e:
        _note(console, f"input history not saved: cannot write {path} ({e.strerror or e})",
              ok=False)
        return InMemoryHistory()
    return _History(path)


def run_repl(session: ChatSession, console: Console, *, history_path: Path | None = None,
             input=None, output=None, safe=lambda s: s) -> int:
    """The interactive loop. ``input``/``output`` are prompt-toolkit's (tests pass pipes)."""
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("enter", filter=Condition(lambda: _open_block(get_app().current_buffer.text)))
    def _block_line(event) -> None:  # inside a """ block Enter adds a line: one message,
        event.current_buffer.insert_text("\n")  # one history entry, editable as a whole

    history, history_failed = _history(history_path, console), False
    prompt_session = PromptSession(history=history,
                                   completer=SlashCompleter(), key_bindings=keys,
                                   prompt_continuation="... ", input=input, output=output)
    _note(console, f"minigpt chat · {session.model_label} · template {session.template.name}"
                   " · /help for commands, Ctrl-D to leave")
    while True:
        label = "you> " if session.template.name == "chat" else "> "  # /load may change it
        try:
            text = prompt_session.prompt(label)
        except KeyboardInterrupt:  # clears the line
            continue
        except EOFError:
            return 0
        if getattr(history, "problem", None) and not history_failed:  # it stops trying
            _note(console, history.problem, ok=False)
            history_failed = True
        quoted = text.strip().startswith('"""')  # a quoted block is a message, whatever it holds
        if quoted:
            text = _unquote(text)
        if not quoted and session.is_command(text):
            try:
                result = session.handle_command(text)
            except KeyboardInterrupt:
                _note(console, "(interrupted)")
                continue
            _show_result(console, result, safe)
            if result.quit:
                return 0
        elif text.strip():
            _show_reply(session, text if quoted else session.message_text(text), console, safe)


def run_piped(session: ChatSession, lines: Iterable[str], out: Console,
              err: Console) -> int:
    """One message per input line. Each reply is printed literally, without surrounding
    whitespace; replies are separated by a blank line (no reply contains one: both
    templates stop there). Slash commands work and report on ``err``, as does ``/stats on``
    after every reply; ``//`` starts a message that starts with ``/``."""
    replies = 0
    for line in lines:
        message = line.rstrip("\r\n")
        if not message.strip():
            continue
        if session.is_command(message):
            result = session.handle_command(message)
            _show_result(err, result)
            if result.quit:
                break
            continue
        out.out(("\n" if replies else "") + _reply(session, session.message_text(message), err))
        replies += 1
        if session.show_stats:  # on stderr, like every note: stdout keeps only the replies
            _note(err, session.stats_text())
    return 0


def _reply(session: ChatSession, message: str, err: Console) -> str:
    """The whole reply to ``message``, without surrounding whitespace; notes go to ``err``."""
    parts = []
    for piece in session.respond(message):
        if isinstance(piece, Notice):
            _note(err, piece.message, ok=False)
        else:
            parts.append(piece)
    return "".join(parts).strip()


JSONL_HINT = ('one JSON value per line: a message as a string ("Hi"), or {"content": "Hi"}, '
              'or {"command": "/reset"}')


def run_jsonl(session: ChatSession, lines: Iterable[str], out: Console, err: Console) -> int:
    """Piped chat as JSON lines, for scripts and for replies with blank lines in them: each
    input line a message (a JSON string, or an object with ``content``) or a slash command
    (``{"command": "/reset"}``, reported on ``err``); each reply one line on ``out``,
    ``{"reply", "finish_reason", "tokens"}``. A line that is none of these stops the chat
    with a one-line error naming it, after the replies before it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise MiniGPTError(f"stdin line {number} is not JSON ({e})", JSONL_HINT) from None
        if isinstance(item, dict) and len(item) == 1 and isinstance(item.get("command"), str) \
                and session.is_command(item["command"]):
            result = session.handle_command(item["command"])
            _show_result(err, result)
            if result.quit:
                break
            continue
        if isinstance(item, dict) and len(item) == 1 and isinstance(item.get("content"), str):
            item = item["content"]
        if not isinstance(item, str):
            raise MiniGPTError(f"stdin line {number} is neither a message nor a command",
                               JSONL_HINT)
        text = _reply(session, item, err)
        result = session.last_result
        out.out(json.dumps({"reply": text, "finish_reason": result.samples[0].finish_reason,
                            "tokens": result.generated_tokens}, ensure_ascii=False),
                highlight=False)
        if session.show_stats:
            _note(err, session.stats_text())
    return 0

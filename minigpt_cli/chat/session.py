"""The chat REPL: a ``ChatSession`` (conversation, templates, slash commands) and the
prompt-toolkit loop around it. Generation itself is ``minigpt_cli.sampling``.

The session never touches a terminal: commands return lines to show and replies are
streamed text, so tests drive it directly. ``run_repl`` is the interactive loop,
``run_piped`` the scriptable one (one message per input line, one reply per output block).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.text import Text

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.sampling import Engine, GenerationResult, Notice, SamplingSettings, TextDelta

HISTORY_FILE = "chat_history"
ROLES = ("System", "User", "Assistant")


def data_dir() -> Path:
    """$MINIGPT_DATA_DIR, else $XDG_DATA_HOME/minigpt, else ~/.local/share/minigpt."""
    if os.environ.get("MINIGPT_DATA_DIR"):
        return Path(os.environ["MINIGPT_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "minigpt"


# ---- conversation and templates ------------------------------------------------------------

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


# ---- slash commands --------------------------------------------------------------------------

# /set key -> (settings field, parser)
SETTABLE = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "max_tokens": ("max_new_tokens", int),
    "seed": ("seed", int),
}
NAMES = {fld: key for key, (fld, _) in SETTABLE.items()}
COMMANDS = {
    "/help": "this list",
    "/set": "/set KEY VALUE: " + ", ".join(SETTABLE) + " (seed none: random)",
    "/show": "model, tokenizer, settings and how much context is used",
    "/reset": "forget the conversation",
    "/system": "/system TEXT sets the system prompt; /system alone clears it",
    "/save": "/save FILE: the conversation and its template, as text (JSON if FILE.json)",
    "/load": "/load FILE: a conversation saved with /save, with its template",
    "/stats": "/stats on|off: speed after every reply",
    "/quit": "leave (Ctrl-D works too)",
}
HELP_FOOTER = ('Enter sends; Esc then Enter adds a line; a line of """ starts and ends a '
               "multi-line message. Ctrl-C stops a reply.")


class Prompt(NamedTuple):
    ids: list[int]
    first_turn: int  # the oldest turn it includes
    cropped: bool  # the newest turn alone was too long: only its end is included


@dataclass
class CommandResult:
    lines: list[str] = field(default_factory=list)
    ok: bool = True
    quit: bool = False
    warnings: list[str] = field(default_factory=list)  # shown after the lines, highlighted


def _fail(line: str) -> CommandResult:
    return CommandResult([line], ok=False)


class ChatSession:
    """A conversation with a model: its turns, template, settings and commands."""

    def __init__(self, engine: Engine, settings: SamplingSettings | None = None,
                 template: str = "plain", system: str = "", model_label: str = ""):
        assert template in TEMPLATES, template
        self.engine = engine
        self.settings = dataclasses.replace(settings or SamplingSettings(), num_samples=1)
        self.template = TEMPLATES[template]
        self.system = system
        self.model_label = model_label
        self.turns: list[Turn] = []
        self.show_stats = False
        self.last_result: GenerationResult | None = None
        self.first_turn_in_context = 0

    # -- replies --

    def build_prompt(self, message: str) -> Prompt:
        """Token ids for the model: the oldest turns go when the conversation and room for
        a reply outgrow the context; if even the newest turn is too long, only its end."""
        ctx = self.engine.context_length
        budget = ctx - min(self.settings.max_new_tokens, ctx // 2)
        encode = self.engine.tokenizer.encode
        for start in range(len(self.turns)):
            ids = encode(self.template.render(self.system, self.turns[start:], message))
            if len(ids) <= budget:
                return Prompt(ids, start, cropped=False)
        last = self.turns[-1:]
        ids = encode(self.template.render(self.system, last, message))
        return Prompt(ids[-budget:], len(self.turns) - len(last), cropped=len(ids) > budget)

    def respond(self, message: str) -> Iterator[str | Notice]:
        """Stream the reply to ``message``; the turn is recorded even if the reply is cut
        short (Ctrl-C closes this generator)."""
        prompt = self.build_prompt(message)
        self.first_turn_in_context = prompt.first_turn
        settings = dataclasses.replace(self.settings, num_samples=1,
                                       stop=[*self.template.stops, *self.settings.stop])
        parts: list[str] = []
        strip = self.template.name == "chat"  # the reply follows "Assistant:" and a space
        try:
            for event in self.engine.generate(prompt.ids, settings):
                if isinstance(event, TextDelta):
                    text = event.text.lstrip() if strip and not parts else event.text
                    if text:
                        parts.append(text)
                        yield text
                elif isinstance(event, Notice):
                    yield event
                elif isinstance(event, GenerationResult):
                    self.last_result = event
        finally:
            self.turns.append(Turn(message, "".join(parts)))

    def reply(self, message: str) -> str:
        return "".join(p for p in self.respond(message) if isinstance(p, str))

    def stats_text(self) -> str:
        r = self.last_result
        if r is None:
            return "no reply yet"
        return (f"{r.generated_tokens} tokens · {r.tokens_per_second:.1f} tokens/s · "
                f"first token {r.time_to_first_token * 1000:.0f} ms · "
                f"{r.samples[0].finish_reason}")

    # -- commands --

    @staticmethod
    def is_command(text: str) -> bool:
        return text.lstrip().startswith("/")

    def handle_command(self, line: str) -> CommandResult:
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        handler = {
            "/help": self._help, "/set": self._set, "/show": self._show,
            "/reset": self._reset, "/system": self._system, "/save": self._save,
            "/load": self._load, "/stats": self._stats, "/quit": self._quit,
            "/exit": self._quit,
        }.get(name)
        if handler is None:
            return _fail(f"unknown command {name}; type /help for the list")
        return handler(arg)

    def _help(self, arg: str) -> CommandResult:
        width = max(map(len, COMMANDS))
        lines = [f"{cmd:<{width}}  {text}" for cmd, text in COMMANDS.items()]
        return CommandResult([*lines, HELP_FOOTER])

    def _set(self, arg: str) -> CommandResult:
        key, _, value = arg.partition(" ")
        key, value = key.strip().lower(), value.strip()
        if key not in SETTABLE or not value:
            return _fail("usage: /set KEY VALUE, KEY one of " + ", ".join(SETTABLE))
        fld, parse = SETTABLE[key]
        if key == "seed" and value.lower() in ("none", "off", "random"):
            parsed = None
        else:
            try:
                parsed = parse(value)
            except ValueError:
                kind = "a whole number" if parse is int else "a number"
                return _fail(f"{key} needs {kind}, got '{value}'")
        candidate = dataclasses.replace(self.settings, **{fld: parsed})
        problem = _problem(candidate)
        if problem:
            return _fail(problem)
        self.settings = candidate
        return CommandResult([f"{key} = {parsed if parsed is not None else 'random'}"])

    def _show(self, arg: str) -> CommandResult:
        e, s = self.engine, self.settings
        settings = ", ".join(f"{NAMES[f]}={getattr(s, f)}" for f in NAMES)
        prompt = self.build_prompt("")
        in_context = len(self.turns) - prompt.first_turn
        cropped = ", the last cut to its end" if prompt.cropped else ""
        return CommandResult([
            f"model      {self.model_label or '?'} ({e.model.num_params() / 1e6:.2f}M "
            f"parameters, on {e.device})",
            f"tokenizer  {getattr(e.tokenizer, 'spec', '?')} "
            f"({e.tokenizer.vocab_size} tokens)",
            f"template   {self.template.name}",
            f"system     {self.system or '(none)'}",
            f"settings   {settings}" + (f", stop={s.stop}" if s.stop else ""),
            f"context    {len(prompt.ids)} of {e.context_length} tokens "
            f"({in_context} of {len(self.turns)} turns{cropped})",
            f"stats      {'on' if self.show_stats else 'off'}",
        ])

    def _reset(self, arg: str) -> CommandResult:
        self.turns.clear()
        self.first_turn_in_context = 0
        return CommandResult(["conversation cleared"])

    def _system(self, arg: str) -> CommandResult:
        self.system = arg
        return CommandResult(["system prompt set" if arg else "system prompt cleared"])

    def _stats(self, arg: str) -> CommandResult:
        if arg.lower() not in ("on", "off", ""):
            return _fail("usage: /stats on|off")
        if arg:
            self.show_stats = arg.lower() == "on"
            return CommandResult([f"stats {arg.lower()}"])
        return CommandResult([self.stats_text()])

    def _quit(self, arg: str) -> CommandResult:
        return CommandResult(quit=True)

    def _save(self, arg: str) -> CommandResult:
        if not arg:
            return _fail("usage: /save FILE (FILE.json for JSON)")
        path = Path(arg).expanduser()
        if path.suffix.lower() == ".json":
            text = json.dumps({"template": self.template.name, "model": self.model_label,
                               "system": self.system,
                               "turns": [dataclasses.asdict(t) for t in self.turns],
                               "settings": self.settings.to_dict()},
                              indent=2, ensure_ascii=False) + "\n"
        else:
            text = transcript(self.system, self.turns, self.template.name, self.model_label)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            return _fail(f"cannot write {path}: {e.strerror or e}")
        return CommandResult([f"saved {len(self.turns)} turns to {path}"])

    def _load(self, arg: str) -> CommandResult:
        if not arg:
            return _fail("usage: /load FILE")
        path = Path(arg).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            return _fail(f"cannot read {path}: {reason}")
        try:
            saved = (_from_json(text) if path.suffix.lower() == ".json"
                     else parse_transcript(text))
        except ValueError as e:
            return _fail(f"{path} is not a saved conversation: {e}")
        self.system, self.turns, self.first_turn_in_context = saved.system, saved.turns, 0
        result = CommandResult([f"loaded {len(saved.turns)} turns from {path}"])
        current = self.template.name
        if saved.template is None or saved.template == current:
            return result
        if saved.template in TEMPLATES:  # the turns read as they were written
            self.template = TEMPLATES[saved.template]
            result.warnings.append(f"template {saved.template}, as saved (it was {current})")
        else:
            result.warnings.append(f"{path} was saved with the template '{saved.template}', "
                                   f"which this version lacks; keeping {current}")
        return result


def _problem(settings: SamplingSettings) -> str | None:
    try:
        settings.validate(names=NAMES)
    except MiniGPTError as e:  # names the /set key
        return e.message
    return None


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
        lines.append(f"System: {system}\n")
    for t in turns:
        lines.append(f"User: {t.user}\nAssistant: {t.assistant.strip()}\n")
    return "\n".join(lines)


def parse_transcript(text: str) -> Saved:
    """Read back ``transcript``: a line starting with a role marker opens a message;
    ``# key: value`` lines before the first message are the header."""
    messages: list[list] = []
    header: dict[str, str] = {}
    for line in text.splitlines():
        role = next((r for r in ROLES if line.startswith(f"{r}:")), None)
        if role:
            messages.append([role, line[len(role) + 1:].removeprefix(" ")])
        elif messages:
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


def _from_json(text: str) -> Saved:
    try:
        raw = json.loads(text)
        system = raw.get("system") or ""
        turns = [Turn(str(t["user"]), str(t["assistant"])) for t in raw["turns"]]
        template = raw.get("template")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError("expected JSON with 'turns' of 'user' and 'assistant'") from e
    return Saved(str(system), turns, str(template) if template else None)


# ---- terminal I/O --------------------------------------------------------------------------

def _note(console: Console, line: str, ok: bool = True) -> None:
    console.print(Text(line, style="dim" if ok else "yellow"), soft_wrap=True)


def _show_result(console: Console, result: CommandResult) -> None:
    for line in result.lines:
        _note(console, line, result.ok)
    for line in result.warnings:
        _note(console, line, ok=False)


def _show_reply(session: ChatSession, message: str, console: Console, safe) -> None:
    pieces = session.respond(message)
    shown = False
    try:
        for piece in pieces:
            if isinstance(piece, Notice):
                _note(console, piece.message, ok=False)
            else:
                console.out(safe(piece), end="")
                shown = True
        if shown:
            console.out("")
        else:  # e.g. the model went straight to the next "User:"
            _note(console, "(empty reply)")
        if session.show_stats:
            _note(console, session.stats_text())
    except KeyboardInterrupt:
        pieces.close()
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


def _history(path: Path | None, console: Console):
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        _note(console, f"input history not saved: cannot write {path} ({e.strerror or e})",
              ok=False)
        return InMemoryHistory()
    return FileHistory(str(path))


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

    prompt_session = PromptSession(history=_history(history_path, console),
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
        if text.strip().startswith('"""'):
            text = _unquote(text)
        if session.is_command(text):
            try:
                result = session.handle_command(text)
            except KeyboardInterrupt:
                _note(console, "(interrupted)")
                continue
            _show_result(console, result)
            if result.quit:
                return 0
        elif text.strip():
            _show_reply(session, text, console, safe)


def run_piped(session: ChatSession, lines: Iterable[str], out: Console,
              err: Console) -> int:
    """One message per input line. Each reply is printed literally, without surrounding
    whitespace; replies are separated by a blank line (no reply contains one: both
    templates stop there). Slash commands work and report on ``err``."""
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
        parts = []
        for piece in session.respond(message):
            if isinstance(piece, Notice):
                _note(err, piece.message, ok=False)
            else:
                parts.append(piece)
        out.out(("\n" if replies else "") + "".join(parts).strip())
        replies += 1
    return 0

"""A conversation with a model: its turns, template, settings and slash commands.

The session never touches a terminal: commands return lines to show and replies are
streamed text, so the REPL (``minigpt_cli.cli.repl``), tests and other front ends drive it
the same way. Generation itself is ``minigpt_cli.generate``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from minigpt_cli.chat.template import TEMPLATES, Template, Turn
from minigpt_cli.chat.transcript import from_json, parse_transcript, transcript
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine, GenerationResult, Notice, TextDelta

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
               "multi-line message; // sends a message that starts with /. Ctrl-C stops a "
               "reply.")


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
                 template: str | Template = "plain", system: str = "", model_label: str = ""):
        template = TEMPLATES[template] if isinstance(template, str) else template
        template.check_tokenizer(engine.tokenizer)  # a MiniGPTError when tokens are missing
        self.engine = engine
        self.settings = dataclasses.replace(settings or SamplingSettings(), num_samples=1)
        self.template = template
        self.system = system
        self.model_label = model_label
        self.turns: list[Turn] = []
        self.show_stats = False
        self.last_result: GenerationResult | None = None
        self.reply_stopped = False  # the last reply was cut short (Ctrl-C): no figures
        self.first_turn_in_context = 0

    # -- replies --

    def build_prompt(self, message: str) -> Prompt:
        """Token ids for the model: the oldest turns go when the conversation and room for
        a reply outgrow the context; if even the newest turn is too long, only its end."""
        budget = self.prompt_budget()
        for start in range(len(self.turns)):
            ids = self.prompt_ids(self.turns[start:], message)
            if len(ids) <= budget:
                return Prompt(ids, start, cropped=False)
        last = self.turns[-1:]
        ids = self.prompt_ids(last, message)
        return Prompt(ids[-budget:], len(self.turns) - len(last), cropped=len(ids) > budget)

    def prompt_budget(self) -> int:
        """Most tokens a prompt may have: the context less room for the reply (at most half)."""
        ctx = self.engine.context_length
        return ctx - min(self.settings.max_new_tokens, ctx // 2)

    def messages(self, turns: list[Turn], message: str) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for t in turns:
            out += [{"role": "user", "content": t.user},
                    {"role": "assistant", "content": t.assistant}]
        return [*out, {"role": "user", "content": message}]

    def prompt_ids(self, turns: list[Turn], message: str) -> list[int]:
        return self.template.render(self.engine.tokenizer, self.messages(turns, message),
                                    add_generation_prompt=True).ids

    def respond(self, message: str) -> Iterator[str | Notice]:
        """Stream the reply to ``message``; the turn is recorded even if the reply is cut
        short (Ctrl-C closes this generator)."""
        prompt = self.build_prompt(message)
        self.first_turn_in_context = prompt.first_turn
        self.reply_stopped = True  # until the reply ends
        settings = dataclasses.replace(self.settings, num_samples=1,
                                       stop=[*self.template.stops, *self.settings.stop])
        parts: list[str] = []
        strip = bool(self.template.reply_prefix)  # "Assistant:" and a space, say
        try:
            own = len(self.prompt_ids([], message))
            if prompt.cropped and own > len(prompt.ids):  # not only an earlier turn was cut
                what = "the system prompt and message are" if self.system else "the message is"
                yield Notice(f"{what} too long for the model's context: of the {own} tokens of "
                             f"the prompt only the last {len(prompt.ids)} are used (the "
                             f"context is {self.engine.context_length}, less room for the "
                             "reply)")
            stop_ids = self.template.stop_ids(self.engine.tokenizer)
            # a reply: stops count after its first visible character (a base model may
            # open with the blank line that ends a plain reply)
            for event in self.engine.generate(prompt.ids, settings, stop_ids, reply=True):
                if isinstance(event, TextDelta):
                    text = event.text.lstrip() if strip and not parts else event.text
                    if text:
                        parts.append(text)
                        yield text
                elif isinstance(event, Notice):
                    yield event
                elif isinstance(event, GenerationResult):
                    self.last_result, self.reply_stopped = event, False
        finally:
            self.turns.append(Turn(message, "".join(parts)))

    def reply(self, message: str) -> str:
        return "".join(p for p in self.respond(message) if isinstance(p, str))

    def stats_text(self) -> str:
        r = self.last_result
        if self.reply_stopped:
            return "the last reply was stopped: no figures for it"
        if r is None:
            return "no reply yet"
        return (f"{r.generated_tokens} tokens · {r.tokens_per_second:.1f} tokens/s · "
                f"first token {r.time_to_first_token * 1000:.0f} ms · "
                f"{r.samples[0].finish_reason}")

    # -- commands --

    @staticmethod
    def is_command(text: str) -> bool:
        """A slash command; ``//`` starts a message that starts with ``/`` instead."""
        text = text.lstrip()
        return text.startswith("/") and not text.startswith("//")

    @staticmethod
    def message_text(text: str) -> str:
        """What a message line sends: ``//etc`` sends ``/etc``."""
        start = len(text) - len(text.lstrip())
        return text[:start] + text[start + 1:] if text[start:].startswith("//") else text

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
            return _fail(f"unknown command {name}; type /help for the list (// sends a "
                         "message that starts with /)")
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
            saved = (from_json(text) if path.suffix.lower() == ".json"
                     else parse_transcript(text))
        except ValueError as e:
            return _fail(f"{path} is not a saved conversation: {e}")
        self.system, self.turns, self.first_turn_in_context = saved.system, saved.turns, 0
        result = CommandResult([f"loaded {len(saved.turns)} turns from {path}"])
        current = self.template.name
        if saved.template is None or saved.template == current:
            return result
        saved_template = TEMPLATES.get(saved.template)
        usable = saved_template is not None and all(
            t in self.engine.tokenizer.added_tokens for t in saved_template.special_tokens)
        if usable:  # the turns read as they were written
            self.template = saved_template
            result.warnings.append(f"template {saved.template}, as saved (it was {current})")
        else:
            lacks = "this version" if saved_template is None else "this model's tokenizer"
            result.warnings.append(f"{path} was saved with the template '{saved.template}', "
                                   f"which {lacks} lacks; keeping {current}")
        return result


def _problem(settings: SamplingSettings) -> str | None:
    try:
        settings.validate()
    except MiniGPTError as e:
        return e.renamed(NAMES)  # by its /set key
    return None

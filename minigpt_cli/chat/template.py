"""Chat templates: how a conversation becomes token ids, which of them are trained, and
where the model's reply ends. One definition serves fine-tuning (ids and a loss mask), the
REPL, ``generate --chat`` and the server (ids for completion), and export (a Jinja
``chat_template`` that renders the same text for Hugging Face's ``apply_chat_template``).

A template lays a conversation out as pieces: text, or a special token that the template
adds to the tokenizer. Text between two special tokens is encoded as one string, as
Hugging Face's tokenizers do after splitting out their added tokens, so both libraries get
the same ids. A run trained on conversations records its template's name in
``chat_template.json``; :func:`template_for_run` is the one place that decides which
template a run uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from minigpt_cli.errors import ConfigError, MiniGPTError

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.json"  # in the run directory


@dataclass
class Turn:
    user: str
    assistant: str


class Piece(NamedTuple):
    text: str
    special: bool = False  # a special token of the template, not text to encode
    trained: bool = False  # the model learns to produce these tokens
    turn_start: bool = False  # a conversation may be split before this piece


class Rendered(NamedTuple):
    ids: list[int]
    trained: list[bool]  # per token: part of an assistant's reply (a training target)
    turn_starts: list[int]  # token positions where a turn begins


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Template:
    """The base: subclasses lay out pieces; rendering to ids is shared."""

    name: str = ""
    special_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None  # the special token that ends the assistant's reply
    stops: tuple[str, ...] = ()  # text that ends a reply (templates without special tokens)
    chat_template: str = ""  # Jinja, for Hugging Face's apply_chat_template
    reply_prefix: str = ""  # what the layout puts before a reply's text, not part of it

    def message_pieces(self, role: str, content: str) -> list[Piece]:
        raise NotImplementedError

    def generation_pieces(self) -> list[Piece]:
        return []

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Piece]:
        out: list[Piece] = []
        for m in messages:
            out.extend(self.message_pieces(m["role"], m["content"]))
        if add_generation_prompt:
            out.extend(self.generation_pieces())
        return out

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as one string (what the Jinja ``chat_template`` renders)."""
        return "".join(p.text for p in self.pieces(messages, add_generation_prompt))

    def check_tokenizer(self, tokenizer) -> None:
        missing = [t for t in self.special_tokens if t not in tokenizer.added_tokens]
        if missing:
            raise MiniGPTError(f"template {self.name} needs the special tokens "
                               f"{', '.join(missing)}, which the model's tokenizer lacks",
                               "fine-tune the model on conversations with this template, "
                               "or use the plain template")

    def stop_ids(self, tokenizer) -> list[int]:
        """The token ids that end the assistant's reply."""
        return [tokenizer.special_id(self.end_of_turn)] if self.end_of_turn else []

    def render(self, tokenizer, messages: list[dict],
               add_generation_prompt: bool = False) -> Rendered:
        """Token ids of ``messages``, which of them are trained, and where turns start."""
        pieces = self.pieces(messages, add_generation_prompt)
        ids: list[int] = []
        trained: list[bool] = []
        starts: list[int] = []
        i = 0
        while i < len(pieces):
            if pieces[i].special:
                p = pieces[i]
                if p.turn_start:
                    starts.append(len(ids))
                ids.append(tokenizer.special_id(p.text))
                trained.append(p.trained)
                i += 1
                continue
            j = i
            while j < len(pieces) and not pieces[j].special:
                j += 1
            self._encode_segment(tokenizer, pieces[i:j], ids, trained, starts)
            i = j
        return Rendered(ids, trained, starts)

    @staticmethod
    def _encode_segment(tokenizer, segment: list[Piece], ids: list[int], trained: list[bool],
                        starts: list[int]) -> None:
        """Encode the text between two special tokens as one string; each token gets the
        flags of the piece it starts in (a token merged across two pieces gets the first's)."""
        full = tokenizer.encode("".join(p.text for p in segment))
        bounds, prefix = [0], ""  # bounds[k]: the first token of piece k
        for prev, p in zip(segment, segment[1:], strict=False):
            prefix += prev.text
            if p.trained == prev.trained and not p.turn_start:
                bounds.append(bounds[-1])  # same flags: where one ends does not matter
            else:
                bounds.append(max(bounds[-1], _common_prefix(tokenizer.encode(prefix), full)))
        bounds.append(len(full))
        base = len(ids)
        ids.extend(full)
        for k, p in enumerate(segment):
            trained.extend([p.trained] * (bounds[k + 1] - bounds[k]))
            if p.turn_start and bounds[k] < len(full):
                starts.append(base + bounds[k])


class PlainTemplate(Template):
    """No format: the model continues the text (a base model's way of chatting)."""

    name = "plain"
    stops = ("\n\n",)
    chat_template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
        "{% elif message['role'] == 'user' %}{{ message['content'] }}"
        "{% else %}{{ message['content'].rstrip() + '\\n' }}{% endif %}"
        "{% endfor %}")

    def message_pieces(self, role: str, content: str) -> list[Piece]:
        if role == "system":
            return [Piece(content + "\n", turn_start=True)]
        if role == "user":
            return [Piece(content, turn_start=True)]
        return [Piece(content.rstrip() + "\n", trained=True)]


class ChatTextTemplate(Template):
    """``User:``/``Assistant:`` lines in plain text, no special tokens."""

    name = "chat"
    stops = ("\nUser:", "\nAssistant:", "\nSystem:", "\n\n")
    reply_prefix = " "  # "Assistant: Hi": the model writes the space with its first word
    chat_template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ 'User: ' + message['content'] + '\\nAssistant:' }}"
        "{% else %}{{ ' ' + message['content'].strip() + '\\n' }}{% endif %}"
        "{% endfor %}")

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Piece]:
        # "Assistant:" belongs to the user's turn, so a prompt always ends with it
        return [p for m in messages for p in self.message_pieces(m["role"], m["content"])]

    def message_pieces(self, role: str, content: str) -> list[Piece]:
        if role == "system":
            return [Piece(f"System: {content}\n", turn_start=True)]
        if role == "user":
            return [Piece(f"User: {content}\nAssistant:", turn_start=True)]
        return [Piece(f" {content.strip()}\n", trained=True)]


class ChatMLTemplate(Template):
    """OpenAI's ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``."""

    name = "chatml"
    special_tokens = ("<|im_start|>", "<|im_end|>")
    end_of_turn = "<|im_end|>"
    chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

    def message_pieces(self, role: str, content: str) -> list[Piece]:
        mine = role == "assistant"
        return [Piece("<|im_start|>", special=True, turn_start=True), Piece(f"{role}\n"),
                Piece(content, trained=mine), Piece("<|im_end|>", special=True, trained=mine),
                Piece("\n")]

    def generation_pieces(self) -> list[Piece]:
        return [Piece("<|im_start|>", special=True, turn_start=True), Piece("assistant\n")]


class MiniGPTTemplate(Template):
    """Compact: one special token per role and one to end a turn, no other text."""

    name = "minigpt"
    special_tokens = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    end_of_turn = "<|end|>"
    chat_template = (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

    def message_pieces(self, role: str, content: str) -> list[Piece]:
        mine = role == "assistant"
        return [Piece(f"<|{role}|>", special=True, turn_start=True),
                Piece(content, trained=mine), Piece("<|end|>", special=True, trained=mine)]

    def generation_pieces(self) -> list[Piece]:
        return [Piece("<|assistant|>", special=True, turn_start=True)]


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    """Add a template to the registry (by its name); built-ins register the same way."""
    TEMPLATES[template.name] = template
    return template


for _t in (PlainTemplate(), ChatTextTemplate(), ChatMLTemplate(), MiniGPTTemplate()):
    register(_t)

DEFAULT_CHAT_TEMPLATE = "minigpt"  # for training on conversations


def get_template(name: str, setting: str = "template") -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"{setting} must be one of {', '.join(TEMPLATES)}, got '{name}'",
                          setting=setting) from None


def save_run_template(run_dir: Path, template: Template) -> None:
    """Record in the run directory that the model was trained with ``template``."""
    from minigpt_cli.fileio import atomic_write_text

    atomic_write_text(run_dir / TEMPLATE_FILE, json.dumps(
        {"name": template.name, "special_tokens": list(template.special_tokens),
         "end_of_turn": template.end_of_turn, "chat_template": template.chat_template},
        indent=2) + "\n")


def saved_template_name(run_dir: Path) -> str | None:
    """The name recorded in the run directory, or None for a base model."""
    path = Path(run_dir) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MiniGPTError(f"{path} is corrupt", "put back the file training wrote") from e
    if not isinstance(name, str):
        raise MiniGPTError(f"{path} is corrupt", "put back the file training wrote")
    return name


def template_for_run(run_dir: Path | None, override: str | None = None) -> Template:
    """Which template a run uses: ``override`` (``--template``) when given, else the one it
    was fine-tuned with, else ``plain`` (a base model continues text)."""
    if override:
        return get_template(override)
    name = saved_template_name(run_dir) if run_dir is not None else None
    if name is None:
        return TEMPLATES["plain"]
    if name not in TEMPLATES:
        raise MiniGPTError(f"{run_dir} was trained with the chat template '{name}', which "
                           "this version lacks", f"use template one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]

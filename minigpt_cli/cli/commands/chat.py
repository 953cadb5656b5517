"""``minigpt chat``: talk to a trained model in a REPL, or script it through stdin."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from minigpt_cli.cli import ui
from minigpt_cli.cli.options import (
    Device,
    MaxNewTokens,
    MinP,
    ModelDir,
    Quantize,
    RepetitionPenalty,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    sampling_settings,
)
from minigpt_cli.errors import MiniGPTError

EXAMPLES = """Examples:

  minigpt chat    # the latest run under runs/, in the chat template it was trained with

  minigpt chat --model runs/tiny --template chat --system 'You are terse.'

  minigpt chat --temperature 0.6 --top-p 0.9

  printf 'Hello\\nHow are you?\\n' | minigpt chat --template chat    # one reply per line

  printf '"Hello"\\n{"content": "Two lines,\\\\nplease"}\\n' | minigpt chat --jsonl

In the chat: /help lists the commands (/set, /show, /reset, /system, /save, /load, /stats,
/quit); Esc then Enter adds a line; Ctrl-C stops a reply; Ctrl-D leaves.
"""


def stdin_lines() -> Iterator[str]:
    """Lines of stdin as they come, as UTF-8 text whatever the locale (in a C or C.UTF-8
    locale ``sys.stdin`` passes bytes that are not UTF-8 on as surrogates); a leading
    byte-order mark is skipped."""
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MiniGPTError(f"the messages on stdin are not UTF-8 text (line {number})",
                               "convert them to UTF-8, e.g. iconv -f latin1 -t utf-8") from e
        yield line.removeprefix("\ufeff") if number == 1 else line


def register(app: typer.Typer) -> None:
    app.command("chat", epilog=EXAMPLES)(chat)


@ui.guarded
def chat(
    model: ModelDir = None,
    template: Annotated[str | None, typer.Option(
        help="How turns become the model's text. Default: the template the run was "
             "fine-tuned with, else plain (the model continues your text). chat: 'User:' "
             "and 'Assistant:' lines; chatml and minigpt need their special tokens. Saved "
             "in transcripts; /load restores it.")] = None,
    system: Annotated[str, typer.Option(help="Text placed before the conversation.")] = "",
    max_new_tokens: MaxNewTokens = 200,
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    device: Device = "auto",
    quantize: Quantize = "none",
    jsonl: Annotated[bool, typer.Option(
        "--jsonl", help="Piped input as JSON lines: each line a message (a JSON string or "
                        "{\"content\": ...}) or {\"command\": \"/reset\"}; each reply "
                        "one JSON line (reply, finish_reason, tokens), blank lines and "
                        "all.")] = False,
) -> None:
    """Chat with a trained model: streamed replies, history, slash commands."""
    from minigpt_cli.chat.template import TEMPLATES, template_for_run

    if template is not None and template not in TEMPLATES:
        raise MiniGPTError(f"--template must be {' or '.join(TEMPLATES)}, got '{template}'")
    if jsonl and sys.stdin.isatty():
        raise MiniGPTError("--jsonl reads the messages from a pipe, not a terminal",
                           "printf '\"Hello\"\\n' | minigpt chat --jsonl")
    settings = sampling_settings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    from minigpt_cli import paths
    from minigpt_cli.chat.session import ChatSession
    from minigpt_cli.cli.repl import HISTORY_FILE, run_jsonl, run_piped, run_repl
    from minigpt_cli.device import configure_backends, select_device
    from minigpt_cli.generate.engine import Engine
    from minigpt_cli.generate.quant import check_quantize, int4_fallback_note, quantize_model
    from minigpt_cli.run.load import load_run

    dev = select_device(device)
    configure_backends(dev)
    quantize = check_quantize(quantize, dev)
    run = load_run(model, dev)
    quantize_model(run.model, quantize)
    if note := int4_fallback_note(run.model, quantize):
        ui.warn(note)
    session = ChatSession(Engine(run.model, run.tokenizer, dev), settings,
                          template=template_for_run(run.run_dir, template),
                          system=system, model_label=str(run.run_dir))
    if jsonl:
        code = run_jsonl(session, stdin_lines(), ui.console, ui.err_console)
    elif not sys.stdin.isatty():
        code = run_piped(session, stdin_lines(), ui.console, ui.err_console)
    else:
        safe = ui.terminal_safe if ui.console.is_terminal else (lambda s: s)
        code = run_repl(session, ui.console, history_path=paths.data_dir() / HISTORY_FILE,
                        safe=safe)
    raise typer.Exit(code)

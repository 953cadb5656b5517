"""The ``minigpt`` Typer app: registers the subcommands, nothing else.

Start-up stays fast (``minigpt --help`` in well under a second): the command modules import
only Typer and Rich at start-up, and the core (torch, numpy, datasets, tiktoken) inside the
command that runs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from minigpt_cli import __version__
from minigpt_cli.cli import ui
from minigpt_cli.cli.commands import chat, convert, evaluate, generate, inspect, serve, train

app = typer.Typer(
    name="minigpt",
    help="Build, train, evaluate and talk to your own small GPT language model.",
    epilog=(
        "Examples:\n\n"
        "  minigpt train --preset tiny\n\n"
        "  minigpt generate --prompt 'The meaning of'\n\n"
        "  minigpt chat\n\n"
        "  minigpt eval --json\n\n"
        "  minigpt inspect model\n\n"
        "  minigpt serve"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minigpt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Build, train, evaluate and talk to your own small GPT language model."""


train.register(app)
generate.register(app)
chat.register(app)
evaluate.register(app)
inspect.register(app)
convert.register(app)
serve.register(app)


def _command_path(args: list[str]) -> str:
    """The command the first words of ``args`` name (``minigpt inspect model``): for the
    usage errors that Click reports without one (an option's value missing)."""
    command, path = typer.main.get_command(app), ["minigpt"]
    for word in args:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            break
        path.append(word)
    return " ".join(path)


def main() -> None:
    """The console script: ``app`` with Click's usage errors as one line, like every other
    error (Typer's own display is a usage line, a hint and a boxed message)."""
    # Click's exceptions, wherever this Typer keeps them (newer ones vendor Click)
    errors = sys.modules[typer.BadParameter.__module__]
    no_args = getattr(errors, "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except no_args:
        app()  # a bare `minigpt` or `minigpt inspect`: the help, as usual
    except errors.UsageError as e:
        path = e.ctx.command_path if e.ctx is not None else _command_path(sys.argv[1:])
        ui.error_line(e.format_message(), f"see '{path} --help'")
        sys.exit(e.exit_code)
    except errors.ClickException as e:
        ui.error_line(e.format_message())
        sys.exit(e.exit_code)
    except typer.Abort:
        ui.error_line("aborted.")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

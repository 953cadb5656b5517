"""``minigpt inspect``: look inside a run, a tokenizer, a dataset, the presets, this machine.

One module per subcommand, each with ``NAME``, ``EXAMPLES`` and its ``command``.
"""

from __future__ import annotations

import typer

from minigpt_cli.cli.commands.inspect import attention, data, env, model, presets, run, tokenizer

SUBCOMMANDS = (model, tokenizer, data, run, attention, presets, env)  # in --help's order

inspect_app = typer.Typer(
    help="Look inside a trained run, a tokenizer, the presets or this machine.",
    epilog=("Examples:\n\n  minigpt inspect model --model runs/tiny-20260101-120000\n\n"
            "  minigpt inspect tokenizer tiktoken:gpt2 'Hello world'\n\n"
            "  minigpt inspect data data/input.txt\n\n"
            "  minigpt inspect run runs/tiny --png run.png\n\n"
            "  minigpt inspect attention --model runs/tiny 'To be, or not'\n\n"
            "  minigpt inspect presets\n\n  minigpt inspect env --device cuda"),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
for sub in SUBCOMMANDS:
    inspect_app.command(sub.NAME, epilog=sub.EXAMPLES)(sub.command)


def register(app: typer.Typer) -> None:
    app.add_typer(inspect_app, name="inspect")

"""``minigpt export`` and ``minigpt import``: models to and from Hugging Face and GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.options import ModelDir

EXPORT_EXAMPLES = """Examples:

  minigpt export --model runs/tiny --format hf --out exported/tiny

  minigpt export --model runs/tiny --format gguf --out tiny.gguf --dtype q8_0

  minigpt export --model runs/lora --adapter-only --format hf --out exported/lora-adapter
"""
IMPORT_EXAMPLES = """Examples:

  minigpt import path/to/gpt2-folder --out runs/gpt2    # save_pretrained's output

  minigpt import hf:openai-community/gpt2 --out runs/gpt2

  minigpt train --init hf:openai-community/gpt2 --dataset mytext.txt --preset gpt2-finetune
"""


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXPORT_EXAMPLES)(export_)
    app.command("import", epilog=IMPORT_EXAMPLES)(import_)


@ui.guarded
def export_(
    out: Annotated[Path, typer.Option(help="Where to write: a new folder (hf) or a new "
                                           ".gguf file (gguf).")],
    model: ModelDir = None,
    format_: Annotated[str, typer.Option(
        "--format", help="hf: a Hugging Face transformers folder; gguf: a file for llama.cpp "
                         "and ollama.")] = "hf",
    dtype: Annotated[str, typer.Option(help="Weights of a gguf file: f32, f16 or q8_0.")
                     ] = "f32",
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="A LoRA run's adapters alone, as a PEFT adapter folder "
                               "(with --format hf). By default they are merged into the "
                               "weights.")] = False,
) -> None:
    """Export a trained run for Hugging Face transformers or llama.cpp (GGUF)."""
    from minigpt_cli.convert.export import check_out, export
    from minigpt_cli.run.load import load_run

    check_out(out, format_, adapter_only)  # before loading anything
    run = load_run(model, "cpu")
    path = export(run, out, format_, dtype, adapter_only)
    ui.console.print(f"Exported {run.run_dir} (step {run.state.get('step', 0):,}) to "
                     f"[bold]{path}[/].")
    if adapter_only:
        hint = f"PeftModel.from_pretrained(base_model, {str(path)!r})"
    elif format_ == "hf":
        hint = f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    else:  # llama.cpp reads the context from the file but defaults -c to its own (4096)
        n_ctx = run.config.model.max_seq_length
        hint = (f"llama-cli -m {path} -c {n_ctx}  ·  ollama create NAME -f Modelfile "
                f"(FROM ./{path.name}, PARAMETER num_ctx {n_ctx})")
    ui.err_console.print(Text(f"Load it with: {hint}", style="dim"), soft_wrap=True)


@ui.guarded
def import_(
    source: Annotated[str, typer.Argument(
        help="A Hugging Face GPT-2 or Llama folder, hf:NAME (from the Hub), or a minigpt "
             "run.")],
    out: Annotated[Path, typer.Option(help="The new run directory.")],
) -> None:
    """Import a GPT-2- or Llama-family checkpoint as a run that generate, chat, eval and
    export use."""
    from minigpt_cli.convert.importing import import_run

    path = import_run(source, out)
    ui.console.print(f"Imported {source} into [bold]{path}[/].")
    ui.err_console.print(Text(f"Next: minigpt chat --model {path}  ·  minigpt train --init "
                              f"{path} --dataset FILE", style="dim"), soft_wrap=True)

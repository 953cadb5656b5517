"""``minigpt inspect attention``: how much each token attends to every earlier one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.charts import HeatMap, visible
from minigpt_cli.cli.commands.inspect.common import emit_json, read_stdin, token_pieces, wrote

NAME = "attention"
EXAMPLES = """Examples:

  minigpt inspect attention --model runs/tiny 'To be, or not to be'

  minigpt inspect attention --model runs/tiny --layer 2 --head 1 'def f(x):' --png att.png

  echo 'from stdin' | minigpt inspect attention --model runs/tiny - --json
"""


@ui.guarded
def command(
    text: Annotated[str, typer.Argument(help="Text to look at ('-' reads standard input).")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Run directory (default: the latest run under runs/).")] = None,
    layer: Annotated[int, typer.Option(help="Layer, counted from 0.")] = 0,
    head: Annotated[int | None, typer.Option(
        help="Head, counted from 0 (default: the mean over the layer's heads).")] = None,
    png: Annotated[Path | None, typer.Option(
        help="Also write the heat map as a PNG image (needs matplotlib).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the weights as JSON.")
                        ] = False,
) -> None:
    """How much each token attends to every earlier one, as a heat map over the tokens."""
    from minigpt_cli.evaluate.attention import attention_map, check_layer_head, scale_max
    from minigpt_cli.run.load import load_run


    run = load_run(model, "cpu")
    check_layer_head(run.model, layer, head)
    if text == "-":
        text = read_stdin()
    ids = [int(i) for i in run.tokenizer.encode(text)]
    context = run.config.model.max_seq_length
    if len(ids) > context:
        ui.warn(f"the text is {len(ids):,} tokens; using the first {context} (the context)")
        ids = ids[:context]
    weights_t = attention_map(run.model, ids, layer, head)
    weights, vmax = weights_t.tolist(), scale_max(weights_t)
    pieces = token_pieces(run.tokenizer, ids)
    heads = run.config.model.num_heads
    which = f"head {head}" if head is not None else f"mean of {heads} heads"
    title = f"{run.run_dir.name} · layer {layer} of {run.config.model.num_layers} · {which}"
    if png is not None:
        from minigpt_cli.cli.figures import attention_figure

        labels = [visible(p) or "·" for p in pieces]  # "": part of a character
        wrote(attention_figure(weights, labels, png, title, vmax))
    if json_out:
        emit_json({"model": str(run.run_dir), "step": run.state.get("step"), "layer": layer,
                   "head": head, "num_layers": run.config.model.num_layers, "num_heads": heads,
                   "ids": ids, "tokens": pieces, "weights": weights})
        return
    ui.console.print(Text(title, style="bold"))
    ui.console.print(Text("rows: each token (query) · columns: the tokens it attends to (keys)",
                          style="dim"))
    ui.console.print(HeatMap(weights, pieces, vmax))

"""``minigpt inspect presets``: the built-in presets and what each one trains."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.commands.inspect.common import emit_json

NAME = "presets"
EXAMPLES = "Examples:\n\n  minigpt inspect presets\n\n  minigpt inspect presets --json\n"


@ui.guarded
def command(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The built-in presets: what each one trains."""
    from minigpt_cli.config import Config, preset_summaries

    rows = []
    for name, description in preset_summaries():
        cfg = Config.from_preset(name)
        m = cfg.model
        row = {"name": name, "description": description, "init": cfg.train.init,
               "context": m.max_seq_length, "layers": m.num_layers, "embed_dim": m.embed_dim,
               "heads": m.num_heads, "tokenizer": cfg.tokenizer.spec,
               "dataset": cfg.data.dataset}
        if cfg.train.init:  # the model and its tokenizer come from there, not the config
            row.update(context=None, layers=None, embed_dim=None, heads=None, tokenizer=None)
        rows.append(row)
    if json_out:
        emit_json(rows)
        return
    table = Table(title="Presets (minigpt train --preset NAME)", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    for r in rows:
        model = (f"the model and tokenizer of {r['init']} (train.init)" if r["init"] else
                 f"{r['layers']} layers × {r['embed_dim']}, context {r['context']} · "
                 f"{r['tokenizer']}")
        setup = f"{model} · {r['dataset']}"
        table.add_row(Text(r["name"]), Text(r["description"]) + Text("\n" + setup, style="dim"))
    ui.console.print(table)

"""``minigpt inspect run``: a run's training history, as charts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.charts import LineChart, Series
from minigpt_cli.cli.commands.inspect.common import emit_json, wrote
from minigpt_cli.errors import CheckpointError, MiniGPTError

NAME = "run"
MIN_HEIGHT = 3  # the loss chart's rows: its top, middle and bottom ticks
EXAMPLES = """Examples:

  minigpt inspect run    # the latest run under runs/

  minigpt inspect run runs/tiny --png tiny.png

  minigpt inspect run runs/tiny --json
"""


@ui.guarded
def command(
    run: Annotated[Path | None, typer.Argument(
        help="Run directory (default: the latest run under runs/).")] = None,
    png: Annotated[Path | None, typer.Option(
        help="Also write the charts as a PNG image (needs matplotlib).")] = None,
    height: Annotated[int, typer.Option(
        help=f"Rows of the loss chart in the terminal (at least {MIN_HEIGHT}).")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the series as JSON.")] = False,
) -> None:
    """Training and validation loss, learning rate and tokens/s over steps, as charts."""
    from minigpt_cli.run.history import read_history
    from minigpt_cli.run.layout import find_latest_run

    if height < MIN_HEIGHT:
        raise MiniGPTError(f"--height must be at least {MIN_HEIGHT}, got {height}")
    if run is None:
        try:
            run = find_latest_run()
        except CheckpointError as e:
            raise CheckpointError(e.message, "pass a run directory: minigpt inspect run DIR, "
                                             "or train one with 'minigpt train'") from e
    history = read_history(run)
    if history.skipped_lines:
        ui.warn(f"skipped {history.skipped_lines} unreadable line(s) of metrics.jsonl")
    info = history.to_dict()
    s = info["summary"]
    title = f"{history.run_dir.name} · step {s['last_step']:,}"
    if png is not None:
        from minigpt_cli.cli.figures import training_figure

        best = s["best_val_loss"]
        suffix = "" if best is None else f" · best validation loss {best:.4f}"
        wrote(training_figure(info, png, title + suffix))
    if json_out:
        emit_json(info)
        return
    train, val = history.train, history.val
    rows = [("steps logged", f"{s['logged_steps']:,} (last step {s['last_step']:,})")]
    if s["final_loss"] is not None:
        rows.append(("training loss", f"{s['final_loss']:.4f} (lowest {s['min_loss']:.4f})"))
    if s["best_val_loss"] is not None:
        rows.append(("validation loss", f"{s['final_val_loss']:.4f} (best {s['best_val_loss']:.4f}"
                                        f" at step {s['best_val_step']:,})"))
    if s["peak_lr"] is not None:
        rows.append(("learning rate", f"{s['final_lr']:.2e} (peak {s['peak_lr']:.2e})"))
    if s["mean_tokens_per_sec"] is not None:
        rows.append(("tokens/s", f"{s['mean_tokens_per_sec']:,.0f} on average"))
    if s["elapsed"] is not None:
        rows.append(("elapsed", f"{ui.human_duration(s['elapsed'])} · {s['epochs']:.2f} epochs"))
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2), title_style="bold")
    table.add_column(style="dim")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    charts = [LineChart("loss", [Series("training", train["step"], train["loss"], "cyan"),
                                 Series("validation", val["step"], val["val_loss"], "yellow", "•")],
                        height=height),
              LineChart("learning rate", [Series("lr", train["step"], train["lr"], "green")],
                        height=max(2, height // 2), fmt=lambda x: f"{x:.2e}"),
              LineChart("tokens/s", [Series("tokens/s", train["step"],
                                            train["tokens_per_sec"], "magenta")],
                        height=max(2, height // 2))]
    ui.console.print(Group(table, *[g for c in charts for g in (Text(), c)]))

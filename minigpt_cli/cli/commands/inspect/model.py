"""``minigpt inspect model``: config, parameters, checkpoint and training state of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from minigpt_cli.cli import ui
from minigpt_cli.cli.commands.inspect.common import emit_json, human_bytes, kv_table

NAME = "model"
EXAMPLES = """Examples:

  minigpt inspect model

  minigpt inspect model --model runs/tiny --json
"""


@ui.guarded
def command(
    model: Annotated[Path | None, typer.Option(
        "--model", help="Run directory (default: the latest run under runs/).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter counts, checkpoint size and training state of a run."""
    from minigpt_cli.run.checkpoint import MODEL_FILE, TRAINING_FILE
    from minigpt_cli.run.load import load_run


    run = load_run(model, "cpu")
    gpt, cfg = run.model, run.config
    files = {name: (run.checkpoint / name).stat().st_size
             for name in (MODEL_FILE, TRAINING_FILE) if (run.checkpoint / name).is_file()}
    on_disk = sum(f.stat().st_size for f in run.checkpoint.iterdir() if f.is_file())
    info = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.state.get("step"),
        "epochs": _epochs_done(run.state),
        "best_val_loss": run.state.get("best_val_loss"),
        "parameters": {**gpt.param_groups_breakdown(), "total": gpt.num_params()},
        "tied_head": gpt.tied,
        "checkpoint_bytes": {"weights": files.get(MODEL_FILE), "training": files.get(
            TRAINING_FILE), "total": on_disk},
        "tokenizer": {"spec": run.tokenizer.spec, "vocab_size": run.tokenizer.vocab_size,
                      "eot_id": run.tokenizer.eot_id},
        "config": cfg.to_dict(),
    }
    if json_out:
        emit_json(info)
        return

    best = info["best_val_loss"]
    m = cfg.model
    overview = kv_table("Run", [
        ("run", run.run_dir),
        ("checkpoint", run.checkpoint.name),
        ("step", "—" if info["step"] is None else f"{info['step']:,}"),
        ("best val loss", "—" if best is None else f"{best:.4f}"),
        ("preset", cfg.preset or "—"),
        ("dataset", cfg.data.dataset),
        ("tokenizer", f"{run.tokenizer.spec} (vocab {run.tokenizer.vocab_size:,}; "
                      f"model vocab {m.vocab_size:,})"),
    ])
    arch = kv_table("Architecture", [
        ("context", f"{m.max_seq_length:,} tokens"),
        ("layers × heads", f"{m.num_layers} × {m.num_heads} (head dim {m.head_dim})"),
        ("width / MLP", f"{m.embed_dim:,} / {m.ff_width:,} ({m.mlp})"),
        ("positions / norm", f"{m.position}"
         + (f" (theta {m.rope_theta:g})" if m.position == "rope" else "")
         + f" / {m.norm}" + (" + qk-norm" if m.qk_norm else "")),
        ("kv heads", f"{m.kv_heads}" + (" (multi-query)" if m.kv_heads == 1 < m.num_heads
                                        else " (grouped-query)" if m.kv_heads < m.num_heads
                                        else "")),
        ("dropout / bias", f"{m.dropout:g} / {'yes' if m.bias else 'no'}"),
    ])
    params = Table(title="Parameters", title_justify="left", box=None, padding=(0, 2))
    params.add_column("component", style="dim")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    total = info["parameters"]["total"]
    for name in ("embeddings", "attention", "mlp", "norms"):
        n = info["parameters"][name]
        params.add_row(name, f"{n:,}", f"{100 * n / total:.1f}%")
    params.add_row("total", f"{total:,}", f"({ui.human_count(total)})", style="bold")
    notes = []
    if info["tied_head"]:
        notes.append("The output head shares the token embedding matrix (tied): its weights "
                     "are counted once, under embeddings.")
    disk = kv_table("On disk", [
        ("weights", human_bytes(files[MODEL_FILE]) if MODEL_FILE in files else "—"),
        ("optimizer and training state",
         human_bytes(files[TRAINING_FILE]) if TRAINING_FILE in files else "—"),
        ("checkpoint total", human_bytes(on_disk)),
    ])
    t = cfg.train
    training = kv_table("Training config", [
        ("batch × accumulation", f"{t.batch_size} × {t.grad_accum_steps}"),
        ("length", f"{t.max_steps:,} steps (train.max_steps)" if t.max_steps
         else f"{t.epochs:g} epochs (train.epochs)"),
        ("trained", "—" if info["step"] is None else f"{info['step']:,} steps"
         + ("" if info["epochs"] is None else f", {info['epochs']:.2f} epochs")
         + f" ({run.checkpoint.name})"),
        ("learning rate", f"{t.learning_rate:g} (warmup {t.warmup_steps}, "
                          f"min ratio {t.min_lr_ratio:g})"),
        ("weight decay / clip", f"{t.weight_decay:g} / {t.grad_clip:g}"),
        ("device / precision", f"{t.device} / {t.precision}"),
    ])
    ui.console.print(Group(overview, Text(), arch, Text(), params,
                           *[Text(n, style="dim") for n in notes], Text(), disk, Text(),
                           training))


def _epochs_done(state: dict) -> float | None:
    """Passes over the training data up to the checkpoint, from its sampler's state."""
    sampler = state.get("sampler")
    if not isinstance(sampler, dict):
        return None
    consumed, windows = sampler.get("consumed"), sampler.get("n_windows")
    if not isinstance(consumed, int) or not isinstance(windows, int) or windows <= 0:
        return None
    return round(consumed / windows, 4)

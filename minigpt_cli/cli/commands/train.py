"""``minigpt train``: options -> config -> prepared run -> trainer, rendered live."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from minigpt_cli.cli import ui
from minigpt_cli.errors import MiniGPTError

EXAMPLES = """Examples:

  minigpt train --preset tiny

  minigpt train --preset small --dataset input.txt --tokenizer tiktoken:gpt2 --max-steps 2000

  minigpt train --config my.yaml --set model.num_layers=6 --set train.learning_rate=3e-4

  minigpt train --out runs/my-run --resume --max-steps 5000
"""


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(train)


@ui.guarded
def train(
    preset: Annotated[str | None, typer.Option(help="Preset to start from (see "
                                                     "'minigpt inspect presets').")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: section.key=value (repeatable).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Text file, folder, wikitext-2, wikitext-103, hf:NAME[:CONFIG] or stdlib-docs.")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="byte, char, tiktoken:NAME|FILE, sentencepiece:unigram|bpe:SIZE or FILE.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/NAME-TIME).")
                   ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    compile_: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the model (faster steps on GPUs after a warm-up of a minute or "
             "so; rarely pays on CPUs).")] = None,
    init: Annotated[str | None, typer.Option(
        help="Start from these weights (and their tokenizer): a Hugging Face GPT-2 folder, "
             "hf:NAME or a minigpt run.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
) -> None:
    """Train a GPT from a preset or config file, with live progress and checkpoints."""
    from minigpt_cli.cli.progress import DataProgress, TrainingView
    from minigpt_cli.config import Config
    from minigpt_cli.train import setup
    from minigpt_cli.train.trainer import TrainingStopped

    if resume and out is None:
        raise MiniGPTError("--resume needs --out DIR, the run to continue")
    overrides = list(set_ or [])
    for key, value in (("data.dataset", dataset), ("tokenizer.spec", tokenizer),
                       ("train.max_steps", max_steps), ("train.epochs", epochs),
                       ("train.seed", seed), ("train.device", device),
                       ("train.compile", compile_), ("train.init", init)):
        if value is not None:
            overrides.append(f"{key}={_yaml_scalar(value)}")
    cfg = Config.from_sources(preset, config, overrides)
    changed = {item.partition("=")[0].strip() for item in overrides}
    if resume and (preset or config):
        changed |= _differences(cfg, Config())

    # Plain progress lines go to stdout, so that a failure is the only line on stderr.
    data_console = ui.err_console if ui.err_console.is_terminal else ui.console
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    try:
        with DataProgress(data_console) as data_view:
            run = setup.prepare(cfg, out, resume=resume, changed=changed, progress=data_view)
    except _Terminated:
        ui.err_console.print("Terminated before training started.")
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, old[signal.SIGTERM])

    model = run.trainer.model
    title = f"minigpt train · {run.run_dir}"
    view = TrainingView(ui.console, title, run.device, run.trainer.precision.name,
                        model.num_params())
    run.trainer.callbacks.append(view)
    for note in run.notes:
        ui.warn(note)
    if run.resumed_from is not None:
        ui.console.print(f"Resuming {run.run_dir} from step {run.trainer.step} "
                         f"({run.resumed_from.name}).")
    resume_hint = f"minigpt train --out {shlex.quote(str(run.run_dir))} --resume"

    received: list[int] = []
    leaving = False

    def on_signal(signum, _frame):
        if leaving:  # training is over and its files are complete: just let it exit
            return
        if received:  # a second signal: leave now; checkpoints are written atomically
            raise KeyboardInterrupt
        received.append(signum)
        run.trainer.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run.trainer.fit()
    except TrainingStopped as stop:
        view.close()
        code = 143 if received and received[0] == signal.SIGTERM else 130
        ui.err_console.print(f"Stopped at step {stop.step}; checkpoint saved in {stop.path}.")
        ui.err_console.print(f"Resume with: [bold]{escape(resume_hint)}[/]", soft_wrap=True)
        raise typer.Exit(code) from None
    except KeyboardInterrupt:  # a second signal: leave at once, files are written atomically
        view.close()
        last = run.trainer.last_checkpoint
        where = f"; resume from {last.name} with: {resume_hint}" if last else ""
        ui.err_console.print(f"Interrupted{escape(where)}", soft_wrap=True)
        raise typer.Exit(130) from None
    except OSError as e:  # metrics.jsonl and friends; checkpoints report their own
        view.close()
        raise MiniGPTError(f"cannot write to {run.run_dir}: {e.strerror or e}",
                           f"free some disk space, then continue with: {resume_hint}") from e
    finally:
        view.close()
        leaving = True
        if not received:  # after a signal the process is exiting: keep ignoring more of them
            for s, handler in old.items():
                signal.signal(s, handler)

    best = "—" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    ui.console.print(f"Done: {result.step} steps in {ui.human_duration(result.elapsed)}, "
                     f"best val loss {best}. Run saved in [bold]{run.run_dir}[/].")
    quoted = shlex.quote(str(run.run_dir))
    ui.console.print(f"Next: minigpt generate --model {quoted} --prompt 'The'  ·  "
                     f"minigpt chat --model {quoted}  ·  minigpt eval --model {quoted}")


class _Terminated(BaseException):
    """SIGTERM before the trainer exists: unwind (temporary files are removed) and exit."""


def _terminate(signum, frame):
    raise _Terminated


def _yaml_scalar(value) -> str:
    """Quote strings so --set parsing keeps them strings (e.g. a dataset named 'null')."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _differences(cfg, default) -> set[str]:
    """Keys where ``cfg`` differs from ``default`` (for --resume with a preset/config)."""
    out = set()
    for section in ("model", "tokenizer", "data", "train"):
        for key, value in vars(getattr(cfg, section)).items():
            if getattr(getattr(default, section), key) != value:
                out.add(f"{section}.{key}")
    return out

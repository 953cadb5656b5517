"""``minigpt train``: options -> config -> prepared run -> trainer, rendered live."""

from __future__ import annotations

import os
import shlex
import signal
import time
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

  minigpt train --init runs/base --lora 8 --dataset mytext.txt --max-steps 500

  minigpt train --preset gpt2 --nproc 8 --compile

  torchrun --nproc-per-node 8 -m minigpt_cli train --preset gpt2 --compile
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
        help="Text file, .jsonl/.json/.parquet records, folder, wikitext-2, wikitext-103, "
             "tinyshakespeare, hf:NAME[:CONFIG] or stdlib-docs.")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="byte, char, tiktoken:NAME|FILE, sentencepiece:unigram|bpe:SIZE or FILE.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/NAME-TIME).")
                   ] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Stop after this many steps (train.max_steps).")] = None,
    epochs: Annotated[float | None, typer.Option(
        help="Passes over the training data (train.epochs); replaces the preset's "
             "train.max_steps. Give it or --max-steps, not both.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (0 to 2**64 - 1).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    compile_: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the model (faster steps on GPUs after a warm-up of a minute or "
             "so; rarely pays on CPUs).")] = None,
    init: Annotated[str | None, typer.Option(
        help="Start from these weights (and their tokenizer): a Hugging Face GPT-2 or "
             "Llama folder, hf:NAME or a minigpt run.")] = None,
    lora: Annotated[int | None, typer.Option(
        "--lora", metavar="RANK",
        help="Fine-tune --init with LoRA adapters of this rank (lora.rank); the base "
             "stays frozen and checkpoints hold the adapters only.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    nproc: Annotated[int | None, typer.Option(
        help="Train in this many processes on this machine (one per GPU; DDP, or FSDP "
             "with --set train.strategy=fsdp), through torchrun's launcher.")] = None,
    nnodes: Annotated[int, typer.Option(
        help="With --nproc: machines in the job, each started with the same command.")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        help="With --nnodes: HOST:PORT where the machines meet (c10d rendezvous).")] = None,
) -> None:
    """Train a GPT from a preset or config file, with live progress and checkpoints."""
    from minigpt_cli.config import Config, override_keys, source_keys

    if resume and out is None:
        raise MiniGPTError("--resume needs --out DIR, the run to continue")
    if lora is not None and lora <= 0:
        raise MiniGPTError(f"--lora (lora.rank) must be a positive rank, got {lora}",
                           "ranks of 4 to 64 are usual; leave it out to train every weight")
    overrides = list(set_ or [])
    for key, value in (("data.dataset", dataset), ("tokenizer.spec", tokenizer),
                       ("train.max_steps", max_steps), ("train.epochs", epochs),
                       ("train.seed", seed), ("train.device", device),
                       ("train.compile", compile_), ("train.init", init),
                       ("lora.rank", lora)):
        if value is not None:
            overrides.append(f"{key}={_yaml_scalar(value)}")
    cfg = Config.from_sources(preset, config, overrides)
    changed = override_keys(overrides)
    if resume and (preset or config):  # every key they set must agree with the run
        changed |= source_keys(preset, config)
    if nproc is not None or nnodes != 1 or rdzv_endpoint:
        argv = _worker_args(preset, config, overrides, out, resume)
        _launch(cfg, nproc, nnodes, rdzv_endpoint, argv, out)
        return
    _train(cfg, out, resume, changed)


def _worker_args(preset, config, overrides, out, resume) -> list[str]:
    """The command line each process of a ``--nproc`` job runs."""
    args = ["train"]
    if preset:
        args += ["--preset", preset]
    if config:
        args += ["--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    if out is not None:
        args += ["--out", str(out)]
    if resume:
        args.append("--resume")
    return args


def _launch(cfg, nproc: int | None, nnodes: int, endpoint: str | None, argv: list[str],
            out: Path | None) -> None:
    import torch

    from minigpt_cli.device import select_device
    from minigpt_cli.train import distributed

    if distributed.launched():
        raise MiniGPTError("--nproc starts the processes itself; under torchrun leave it out")
    if nproc is None or nproc < 1:
        raise MiniGPTError(f"--nproc must be at least 1, got {nproc}" if nproc is not None
                           else "--nnodes and --rdzv-endpoint need --nproc")
    if nnodes < 1:
        raise MiniGPTError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes > 1 and not endpoint:
        raise MiniGPTError("--nnodes needs --rdzv-endpoint HOST:PORT, where the nodes meet",
                           "the same on every node, e.g. the first node's address and 29500")
    if select_device(cfg.train.device).type == "cuda":  # a device that is not there: its error
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise MiniGPTError(f"--nproc {nproc} is more than the {gpus} GPU"
                               f"{'s' * (gpus != 1)} of this machine",
                               f"use --nproc {gpus} or fewer: one process per GPU")
    elif nproc > (os.cpu_count() or 1):
        ui.warn(f"--nproc {nproc} is more than the {os.cpu_count()} CPU cores of this "
                "machine: the processes will compete for them")
    code, failures = distributed.launch(nproc, argv, nnodes, endpoint)
    hint = (f"minigpt train --nproc {nproc} --out {shlex.quote(str(out))} --resume"
            if out is not None else "minigpt train --nproc N --out RUN --resume")
    # A rank that died says nothing itself; the launcher ends the others with SIGTERM,
    # and the ranks that exited with an error said why.
    died = [f for f in failures if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    if not died and all(f.exitcode < 0 for f in failures):
        died = failures[:1]
    for failure in died:
        ui.error_line(f"{failure.describe()}; the other ranks stopped",
                      f"resume from the last checkpoint with: {hint}")
    if code:
        raise typer.Exit(code)


def _train(cfg, out: Path | None, resume: bool, changed: set[str]) -> None:
    """One process of training: the whole job, or one rank of a torchrun job."""
    from minigpt_cli.train import distributed

    rank = distributed.env_info()
    try:
        with ui.quiet_after_broken_pipe(ui.console):  # stdout's reader gone: train on
            _train_rank(cfg, out, resume, changed, rank)
    except MiniGPTError as e:
        # every rank of a job meets the same user error; rank 0 says it. A lost peer is
        # each rank's own news.
        if rank.is_main or isinstance(e, distributed.PeerLost):
            raise
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C while setting up reaches every rank: rank 0 says it
        if rank.is_main:
            raise
        raise typer.Exit(130) from None
    finally:
        distributed.cleanup()


def _train_rank(cfg, out, resume, changed, rank) -> None:
    from minigpt_cli.cli.progress import DataProgress, TrainingView
    from minigpt_cli.train import setup
    from minigpt_cli.train.trainer import TrainingStopped

    main = rank.is_main

    # Plain progress lines go to stdout, so that a failure is the only line on stderr.
    data_console = ui.err_console if ui.err_console.is_terminal else ui.console
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    try:
        with DataProgress(data_console, enabled=main) as data_view:
            run = setup.prepare(cfg, out, resume=resume, changed=changed, progress=data_view)
    except _Terminated:
        if main:
            ui.err_console.print("Terminated before training started.")
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, old[signal.SIGTERM])

    model = run.trainer.model
    title = f"minigpt train · {run.run_dir}"
    if rank.enabled:
        title += f" · {rank.world_size} processes ({run.config.train.strategy})"
    from minigpt_cli.model.lora import count_parameters

    trainable, total = count_parameters(model)
    view = TrainingView(ui.console, title, run.device, run.trainer.precision.name,
                        total, trainable)
    if main:
        run.trainer.callbacks.append(view)
        for note in run.notes:
            ui.warn(note)
        if run.resumed_from is not None:
            ui.console.print(f"Resuming {run.run_dir} from step {run.trainer.step} "
                             f"({run.resumed_from.name}).")
    resume_hint = f"minigpt train --out {shlex.quote(str(run.run_dir))} --resume"
    if rank.enabled:
        resume_hint = (f"minigpt train --nproc {rank.world_size} "
                       f"--out {shlex.quote(str(run.run_dir))} --resume")
    say = ui.err_console.print if main else (lambda *a, **k: None)

    received: list[float] = []
    leaving = False

    def on_signal(signum, _frame):
        if leaving:  # training is over and its files are complete: just let it exit
            return
        # In a job, Ctrl-C reaches a rank twice at once (from the terminal and from the
        # launcher passing it on): that is one request to stop, not two.
        if received and not (rank.enabled and time.monotonic() - received[1] < 2.0):
            raise KeyboardInterrupt  # a second signal: leave now; files are atomic
        if not received:
            received.extend([signum, time.monotonic()])
        run.trainer.request_stop(signum)  # SIGTERM (15) outranks SIGINT (2) over the ranks

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with run.discarded_on_failure():  # a new run that fails before its first checkpoint
            result = run.trainer.fit()
    except TrainingStopped as stop:
        view.close()
        code = 143 if stop.reason == signal.SIGTERM else 130  # the job's, not this rank's
        say(f"Stopped at step {stop.step}; checkpoint saved in {stop.path}.")
        say(f"Resume with: [bold]{escape(resume_hint)}[/]", soft_wrap=True)
        raise typer.Exit(code) from None
    except KeyboardInterrupt:  # a second signal: leave at once, files are written atomically
        view.close()
        last = run.trainer.last_checkpoint
        where = f"; resume from {last.name} with: {resume_hint}" if last else ""
        say(f"Interrupted{escape(where)}", soft_wrap=True)
        raise typer.Exit(130) from None
    except OSError as e:  # metrics.jsonl and friends; checkpoints report their own
        view.close()
        then = f"continue with: {resume_hint}" if run.trainer.last_checkpoint else "train again"
        raise MiniGPTError(f"cannot write to {run.run_dir}: {e.strerror or e}",
                           f"free some disk space, then {then}") from e
    finally:
        view.close()
        leaving = True
        if not received:  # after a signal the process is exiting: keep ignoring more of them
            for s, handler in old.items():
                signal.signal(s, handler)

    if not main:
        return
    best = "—" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    ui.console.print(f"Done: {result.step} steps in {ui.human_duration(result.elapsed)}, "
                     f"best val loss {best}. Run saved in [bold]{run.run_dir}[/].")
    quoted = shlex.quote(str(run.run_dir))
    if run.chat_example is not None:
        from rich.text import Text

        shown = Text("The loss counts only the «marked» tokens (the assistant's), e.g. ",
                     style="dim")
        for text, trained in run.chat_example:
            text = ui.terminal_safe(text)
            shown.append(f"«{text}»" if trained else text,
                         style="bold green" if trained else "dim")
        ui.console.print(shown, soft_wrap=True)
        ui.console.print(f"Next: minigpt chat --model {quoted}  ·  minigpt generate --model "
                         f"{quoted} --chat --prompt 'Hello'  ·  minigpt eval --model {quoted}")
        return
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

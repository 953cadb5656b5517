"""``minigpt inspect``: look inside a run, a tokenizer, the presets and this machine."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

import minigpt_tokenizers
from minigpt_cli import __version__, data, ui
from minigpt_cli.checkpoint import (
    MODEL_FILE,
    TOKENIZER_DIR,
    TRAINING_FILE,
    is_run_dir,
    load_run,
    load_tokenizer,
)
from minigpt_cli.config import Config, ModelConfig, preset_summaries
from minigpt_cli.device import Precision, describe, select_device, select_precision
from minigpt_cli.errors import TokenizerError
from minigpt_cli.model import GPT
from minigpt_cli.progress import DataProgress
from minigpt_tokenizers import TextSource

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

SAMPLE_TEXT = "Hello, world! Tokenizers cut text into pieces: naïve café, 3.14159, def f(x):"
TOKEN_STYLES = ("black on cyan", "black on yellow")
PACKAGES = ("torch", "numpy", "tiktoken", "sentencepiece", "datasets", "safetensors",
            "typer", "rich", "prompt-toolkit", "pyyaml")
COMMAND_ORDER = ("model", "tokenizer", "data", "run", "attention", "presets", "env")  # in --help
MAX_PREFIX_DECODE = 2000  # longer texts: decode each token alone instead of by prefixes


def register(app: typer.Typer) -> None:
    from minigpt_cli.commands import inspect_plots  # data, run, attention: they use helpers here

    if "attention" not in {c.name for c in inspect_app.registered_commands}:
        inspect_plots.register(inspect_app)
        inspect_app.registered_commands.sort(key=lambda c: COMMAND_ORDER.index(c.name))
    app.add_typer(inspect_app, name="inspect")


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table; values are shown literally (never as markup)."""
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ---- inspect model ---------------------------------------------------------------------------

MODEL_EXAMPLES = """Examples:

  minigpt inspect model

  minigpt inspect model --model runs/tiny --json
"""


@inspect_app.command("model", epilog=MODEL_EXAMPLES)
@ui.guarded
def model_(
    model: Annotated[Path | None, typer.Option(
        "--model", help="Run directory (default: the latest run under runs/).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter counts, checkpoint size and training state of a run."""
    run = load_run(model, "cpu")
    gpt, cfg = run.model, run.config
    files = {name: (run.checkpoint / name).stat().st_size
             for name in (MODEL_FILE, TRAINING_FILE) if (run.checkpoint / name).is_file()}
    on_disk = sum(f.stat().st_size for f in run.checkpoint.iterdir() if f.is_file())
    info = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.state.get("step"),
        "best_val_loss": run.state.get("best_val_loss"),
        "parameters": {**gpt.param_groups_breakdown(), "total": gpt.num_params()},
        "tied_head": gpt.lm_head.weight is gpt.transformer.wte.weight,
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
    overview = _kv_table("Run", [
        ("run", run.run_dir),
        ("checkpoint", run.checkpoint.name),
        ("step", "—" if info["step"] is None else f"{info['step']:,}"),
        ("best val loss", "—" if best is None else f"{best:.4f}"),
        ("preset", cfg.preset or "—"),
        ("dataset", cfg.data.dataset),
        ("tokenizer", f"{run.tokenizer.spec} (vocab {run.tokenizer.vocab_size:,}; "
                      f"model vocab {m.vocab_size:,})"),
    ])
    arch = _kv_table("Architecture", [
        ("context", f"{m.max_seq_length:,} tokens"),
        ("layers × heads", f"{m.num_layers} × {m.num_heads} (head dim {m.head_dim})"),
        ("width / MLP", f"{m.embed_dim:,} / {m.ff_dim:,}"),
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
    disk = _kv_table("On disk", [
        ("weights", _human_bytes(files[MODEL_FILE]) if MODEL_FILE in files else "—"),
        ("optimizer and training state",
         _human_bytes(files[TRAINING_FILE]) if TRAINING_FILE in files else "—"),
        ("checkpoint total", _human_bytes(on_disk)),
    ])
    t = cfg.train
    training = _kv_table("Training config", [
        ("batch × accumulation", f"{t.batch_size} × {t.grad_accum_steps}"),
        ("steps / epochs", f"{t.max_steps if t.max_steps else '—'} / {t.epochs:g}"),
        ("learning rate", f"{t.learning_rate:g} (warmup {t.warmup_steps}, "
                          f"min ratio {t.min_lr_ratio:g})"),
        ("weight decay / clip", f"{t.weight_decay:g} / {t.grad_clip:g}"),
        ("device / precision", f"{t.device} / {t.precision}"),
    ])
    ui.console.print(Group(overview, Text(), arch, Text(), params,
                           *[Text(n, style="dim") for n in notes], Text(), disk, Text(),
                           training))


# ---- inspect tokenizer -----------------------------------------------------------------------

TOKENIZER_EXAMPLES = """Examples:

  minigpt inspect tokenizer byte 'Hello, world!'

  minigpt inspect tokenizer tiktoken:gpt2 'Hello, world!' --json

  minigpt inspect tokenizer runs/tiny 'How does my run cut this?'

  minigpt inspect tokenizer tiktoken:gpt2 --dataset data/tinyshakespeare/input.txt

  echo 'from stdin' | minigpt inspect tokenizer byte -
"""


class _NeedsTraining(Exception):
    """Raised by the stand-in training text: the tokenizer wanted to learn a vocabulary."""


def _no_training_text():
    raise _NeedsTraining


def resolve_tokenizer(spec: str, training_text: TextSource | None = None):
    """A tokenizer from a spec, a run directory or a run's tokenizer/ folder.

    A spec that learns its vocabulary (char, sentencepiece) learns it from
    ``training_text``; without one, that is an error that points to a run directory.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_run_dir(path) or (path / TOKENIZER_DIR / minigpt_tokenizers.META_FILE).is_file():
            return load_tokenizer(path)
        if (path / minigpt_tokenizers.META_FILE).is_file():
            return minigpt_tokenizers.load(path)
        raise TokenizerError(f"{spec} is a folder but not a run directory",
                             "pass a directory made by 'minigpt train', or a spec like byte")
    name, _ = minigpt_tokenizers.parse_spec(spec)
    if ("/" in name or os.sep in name) and ":" not in spec:
        raise TokenizerError(f"no such run directory: {spec}",
                             "pass a run directory or a tokenizer spec such as byte")
    try:
        return minigpt_tokenizers.create(spec, training_text=training_text or _no_training_text)
    except _NeedsTraining:
        raise TokenizerError(f"the '{spec}' tokenizer learns its vocabulary from training text",
                             "pass a run directory to see a trained one (minigpt inspect "
                             "tokenizer runs/NAME), or --dataset to learn one") from None


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, so that the pieces concatenate to the decoded text.

    Decoding growing prefixes keeps multi-byte characters that span several tokens whole
    (the piece goes to the token that completes the character) and keeps tokenizers that
    drop a leading space when a token is decoded alone honest.
    """
    if len(ids) > MAX_PREFIX_DECODE:
        return [tokenizer.decode([i]) for i in ids]
    pieces, emitted = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        if i + 1 < len(ids):
            text = text.rstrip("\ufffd")  # an unfinished character: wait for its last byte
        common = os.path.commonprefix([emitted, text])
        pieces.append(text[len(common):])
        emitted = text
    return pieces


@inspect_app.command("tokenizer", epilog=TOKENIZER_EXAMPLES)
@ui.guarded
def tokenizer_(
    spec: Annotated[str, typer.Argument(
        help="A tokenizer spec (byte, tiktoken:gpt2, ...) or a run directory.")],
    text: Annotated[str | None, typer.Argument(
        help="Text to tokenize ('-' reads standard input). Default: a sample, or the start "
             "of --dataset.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Also measure bytes per token on a dataset: a text file, folder, wikitext-2, "
             "hf:NAME[:CONFIG] or stdlib-docs. Tokenizers that learn a vocabulary learn it "
             "from its training split.")] = None,
    split: Annotated[str, typer.Option(help="Split of --dataset to measure.")] = "train",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show how a tokenizer cuts text into tokens, with their ids."""
    source = data.resolve_source(dataset) if dataset is not None else None
    tok = resolve_tokenizer(spec, None if source is None else lambda: source.iter_text("train"))
    corpus = _dataset_ratio(source, split, tok, show_progress=not json_out) if source else None
    if text is None:
        text = SAMPLE_TEXT if source is None else _opening(source, corpus["split"])
    elif text == "-":
        text = sys.stdin.read()
    ids = [int(i) for i in tok.encode(text)]
    pieces = token_pieces(tok, ids)
    num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    per_token = num_bytes / len(ids) if ids else None
    info = {"spec": tok.spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "text": text,
            "ids": ids, "tokens": pieces, "num_tokens": len(ids), "num_bytes": num_bytes,
            "bytes_per_token": per_token, "dataset": corpus}
    if json_out:
        emit_json(info)
        return
    shown = Text()
    for i, piece in enumerate(pieces):  # a newline gets a visible mark to carry its colour
        shown.append(piece.replace("\n", "↵\n"), style=TOKEN_STYLES[i % len(TOKEN_STYLES)])
    ratio = "—" if per_token is None else f"{per_token:.2f}"
    ui.console.print(Text(f"{tok.spec} · vocabulary {tok.vocab_size:,} · end-of-text id "
                          f"{tok.eot_id}", style="bold"))
    ui.console.print(shown)
    if ui.console.color_system is None:  # no colours to show the boundaries: list the pieces
        ui.console.print(Text("tokens: ", style="dim") + Text(" ".join(map(repr, pieces))))
    ui.console.print(Text("ids: ", style="dim") + Text(" ".join(map(str, ids))))
    ui.console.print(Text(f"{len(ids):,} tokens · {num_bytes:,} bytes · {ratio} bytes per token",
                          style="dim"))
    if corpus is not None:
        ui.console.print(Text(f"{corpus['name']} ({corpus['split']}): {corpus['tokens']:,} "
                              f"tokens · {corpus['bytes']:,} bytes · "
                              f"{corpus['bytes_per_token']:.2f} bytes per token", style="bold"))


OPENING_CHARS = 300  # of a dataset, shown when no text is given


def _opening(source: data.DataSource, split: str) -> str:
    """The first lines of a split, about ``OPENING_CHARS`` long."""
    head = next(iter(source.iter_text(split)), "")[:OPENING_CHARS * 2]
    cut = head.rfind("\n", 0, OPENING_CHARS) + 1
    return head[:cut] if cut > 0 else head[:OPENING_CHARS]


def _dataset_ratio(source: data.DataSource, split: str, tok, show_progress: bool
                   ) -> dict[str, Any]:
    """Bytes per token over a whole split, from the token cache (encoded once, then reused)."""
    split = source.check_split(split)
    view = DataProgress(ui.err_console) if show_progress and ui.err_console.is_terminal else None
    try:
        arr = data.token_cache(source, split, tok, progress=None if view is None else (
            lambda done, total: view(f"tokenizing {split}", done, total)))
    finally:
        if view is not None:
            view.close()
    return {"name": source.name, "split": split, "bytes": arr.num_bytes,
            "tokens": arr.num_tokens, "bytes_per_token": arr.num_bytes / arr.num_tokens}


# ---- inspect presets -------------------------------------------------------------------------

@inspect_app.command("presets", epilog="Examples:\n\n  minigpt inspect presets\n\n"
                                       "  minigpt inspect presets --json\n")
@ui.guarded
def presets(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The built-in presets: what each one trains."""
    rows = []
    for name, description in preset_summaries():
        cfg = Config.from_preset(name)
        m = cfg.model
        rows.append({"name": name, "description": description,
                     "context": m.max_seq_length, "layers": m.num_layers,
                     "embed_dim": m.embed_dim, "heads": m.num_heads,
                     "tokenizer": cfg.tokenizer.spec, "dataset": cfg.data.dataset})
    if json_out:
        emit_json(rows)
        return
    table = Table(title="Presets (minigpt train --preset NAME)", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    for r in rows:
        setup = (f"{r['layers']} layers × {r['embed_dim']}, context {r['context']} · "
                 f"{r['tokenizer']} · {r['dataset']}")
        table.add_row(Text(r["name"]), Text(r["description"]) + Text("\n" + setup, style="dim"))
    ui.console.print(table)


# ---- inspect env -----------------------------------------------------------------------------

ENV_EXAMPLES = """Examples:

  minigpt inspect env

  minigpt inspect env --device cpu --json
"""


def self_test(device: torch.device, precision: Precision) -> dict[str, Any]:
    """One forward, backward and AdamW step of a tiny GPT on ``device``."""
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, max_seq_length=16, embed_dim=32, num_heads=2,
                          num_layers=2, ff_dim=64, dropout=0.0)
        model = GPT(cfg).to(device)
        opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-2)
        data = torch.randint(0, 64, (4, 17), device=device)
        x, y = data[:, :-1], data[:, 1:]
        before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
        with precision.autocast(device):
            _, loss = model(x, y)
        if precision.needs_scaler:
            scaler = torch.amp.GradScaler(device.type)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad(), precision.autocast(device):
            _, after = model(x, y)
        changed = not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        loss_before, loss_after = float(loss.detach()), float(after)
        ok = math.isfinite(loss_before) and math.isfinite(loss_after) and changed
        error = None if ok else "non-finite loss or weights that did not change"
    except Exception as e:  # any failure here is the finding we report
        ok, loss_before, loss_after = False, None, None
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return {"passed": ok, "seconds": time.perf_counter() - start, "loss_before": loss_before,
            "loss_after": loss_after, "error": error}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict[str, Any]:
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": props.name,
                         "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    mps = getattr(torch.backends, "mps", None)
    return {"cpu_threads": torch.get_num_threads(), "cuda_version": torch.version.cuda,
            "cuda": cuda, "mps": bool(mps and mps.is_available())}


@inspect_app.command("env", epilog=ENV_EXAMPLES)
@ui.guarded
def env(
    device: Annotated[str, typer.Option(help="Device to check: auto, cpu, cuda, cuda:N or "
                                             "mps.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Versions, available devices, and a quick training self-test on the chosen device."""
    dev = select_device(device)
    prec = select_precision("auto", dev)
    info = {
        "versions": {"minigpt": __version__, "python": platform.python_version(),
                     **{p: _version(p) for p in PACKAGES}},
        "platform": platform.platform(),
        "devices": _devices(),
        "tokenizers": sorted(minigpt_tokenizers.available()),
        "device": str(dev),
        "device_description": describe(dev),
        "precision": prec.name,
        "self_test": self_test(dev, prec),
    }
    if json_out:
        emit_json(info)
    else:
        versions = _kv_table("Versions", [(k, v or "not installed")
                                          for k, v in info["versions"].items()])
        d = info["devices"]
        gpus = [f"cuda:{g['index']}: {g['name']} ({g['memory_gib']} GiB, "
                f"compute {g['capability']})" for g in d["cuda"]]
        devices = _kv_table("Devices", [
            ("cpu", f"{d['cpu_threads']} threads · {info['platform']}"),
            ("cuda", "\n".join(gpus) if gpus else
             "not available" + (f" (torch built with CUDA {d['cuda_version']})"
                                if d["cuda_version"] else " (CPU-only torch build)")),
            ("mps", "available" if d["mps"] else "not available"),
            ("tokenizers", ", ".join(info["tokenizers"])),
            ("chosen", f"{info['device_description']} · {prec.name}"),
        ])
        st = info["self_test"]
        if st["passed"]:
            verdict = Text(f"passed in {st['seconds'] * 1000:.0f} ms (loss {st['loss_before']:.3f} "
                           f"→ {st['loss_after']:.3f} after one step)", style="green")
        else:
            verdict = Text(f"FAILED after {st['seconds'] * 1000:.0f} ms: {st['error']}",
                           style="bold red")
        test = _kv_table("Self-test (tiny GPT: forward, backward, one AdamW step)",
                         [(str(dev), verdict)])
        ui.console.print(Group(versions, Text(), devices, Text(), test))
    if not info["self_test"]["passed"]:
        raise typer.Exit(1)


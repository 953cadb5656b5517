"""``minigpt inspect env``: versions, devices and a training self-test on one of them."""

from __future__ import annotations

import math
import platform
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from minigpt_cli import __version__
from minigpt_cli.cli import ui
from minigpt_cli.cli.commands.inspect.common import emit_json, kv_table

if TYPE_CHECKING:
    import torch

    from minigpt_cli.device import Precision

NAME = "env"
PACKAGES = ("torch", "numpy", "tiktoken", "sentencepiece", "datasets", "safetensors",
            "typer", "rich", "prompt-toolkit", "pyyaml")
EXAMPLES = """Examples:

  minigpt inspect env

  minigpt inspect env --device cpu --json
"""


def self_test(device: torch.device, precision: Precision) -> dict[str, Any]:
    """One forward, backward and AdamW step of a tiny GPT on ``device``."""
    import torch

    from minigpt_cli.config import ModelConfig
    from minigpt_cli.model.gpt import GPT

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
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict[str, Any]:
    import torch

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


@ui.guarded
def command(
    device: Annotated[str, typer.Option(help="Device to check: auto, cpu, cuda, cuda:N or "
                                             "mps.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Versions, available devices, and a quick training self-test on the chosen device."""
    import minigpt_tokenizers
    from minigpt_cli.device import describe, select_device, select_precision


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
        versions = kv_table("Versions", [(k, v or "not installed")
                                          for k, v in info["versions"].items()])
        d = info["devices"]
        gpus = [f"cuda:{g['index']}: {g['name']} ({g['memory_gib']} GiB, "
                f"compute {g['capability']})" for g in d["cuda"]]
        devices = kv_table("Devices", [
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
        test = kv_table("Self-test (tiny GPT: forward, backward, one AdamW step)",
                         [(str(dev), verdict)])
        ui.console.print(Group(versions, Text(), devices, Text(), test))
    if not info["self_test"]["passed"]:
        raise typer.Exit(1)

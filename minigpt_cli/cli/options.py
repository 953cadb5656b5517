"""Options that several commands share, and the flag that sets each core setting.

Core errors name settings (``temperature``, ``layer``); ``SETTING_FLAGS`` says which flag
sets each one, so that a command-line user reads ``--temperature`` instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from minigpt_cli.generate.decoding import SamplingSettings

SETTING_FLAGS = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
    "num_samples": "--num-samples", "seed": "--seed", "stop": "--stop",
    "layer": "--layer", "head": "--head", "stride": "--stride", "batch_size": "--batch-size",
    "model": "--model", "out": "--out", "device": "--device", "format": "--format",
    "dtype": "--dtype", "quantize": "--quantize", "adapter_only": "--adapter-only",
    "max_batch": "--max-batch", "max_queue": "--max-queue", "queue_timeout": "--queue-timeout",
    "stream_interval": "--stream-interval", "cors_origin": "--cors-origin",
    "template": "--template", "host": "--host", "port": "--port", "api_key": "--api-key",
    "val_fraction": "--val-fraction",
}

# Sampling options, shared with ``minigpt chat``.
MaxNewTokens = Annotated[int, typer.Option(
    "--max-new-tokens", help="Most tokens to generate per sample.")]
Temperature = Annotated[float, typer.Option(
    help="Randomness: 0 is greedy, 1 samples the model's distribution as is.")]
TopK = Annotated[int, typer.Option(help="Sample among the K most likely tokens (0: off).")]
TopP = Annotated[float, typer.Option(
    help="Nucleus: sample among the most likely tokens that make up this probability (1: off).")]
MinP = Annotated[float, typer.Option(
    help="Drop tokens less likely than this fraction of the most likely one (0: off).")]
RepetitionPenalty = Annotated[float, typer.Option(
    help="Above 1, make tokens of the last 64 less likely to come again (1: off).")]
Stop = Annotated[list[str] | None, typer.Option(
    "--stop", metavar="TEXT", help="End a sample at this text, left out of the output (repeatable; "
                   "\\n and \\t are understood).")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible samples.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Quantize = Annotated[str, typer.Option(
    help="Run the model's linear layers and head quantised on the CPU: none, int8 "
         "(per-row scales) or int4 (groups of 32).")]
ModelDir = Annotated[Path | None, typer.Option(
    "--model", help="Run directory. Default: the latest run under runs/.")]
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def sampling_settings(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      min_p: float, repetition_penalty: float, stop: list[str] | None,
                      seed: int | None, num_samples: int = 1) -> SamplingSettings:
    """The sampling options of ``generate`` and ``chat``, checked before any model loads."""
    from minigpt_cli.generate.decoding import SamplingSettings

    return SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty,
        stop=[unescape(s) for s in stop or []], seed=seed, num_samples=num_samples).validate()

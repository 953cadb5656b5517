"""Loading a run for inference: its config, tokenizer and weights, all from its directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import minigpt_tokenizers
from minigpt_cli.config import Config
from minigpt_cli.errors import CheckpointError, ConfigError
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run.checkpoint import checkpoint_dir, load_weights, read_state
from minigpt_cli.run.layout import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    check_run_dir,
    find_latest_run,
    inside,
)


def load_config(run_dir: Path) -> Config:
    try:
        return Config.from_file(inside(run_dir, run_dir / CONFIG_FILE)).validate()
    except ConfigError as e:
        raise CheckpointError(f"{run_dir} has an unusable config: {e}") from e


def load_tokenizer(run_dir: Path):
    """The run's tokenizer; ``minigpt_tokenizers.load`` keeps its files inside the folder."""
    try:
        return minigpt_tokenizers.load(inside(run_dir, run_dir / TOKENIZER_DIR))
    except minigpt_tokenizers.TokenizerError as e:
        raise CheckpointError(e.message, "put back the tokenizer/ folder the run was "
                              "trained with") from e


@dataclass
class LoadedRun:
    run_dir: Path
    config: Config
    tokenizer: Any
    model: GPT
    checkpoint: Path
    state: dict[str, Any]


def load_run(path: Path | None, device: torch.device | str = "cpu",
             which: str = "best") -> LoadedRun:
    """Model, tokenizer and config of a run, all from its directory, ready for inference."""
    run_dir = find_latest_run() if path is None else check_run_dir(Path(path))
    config = load_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    if config.model.vocab_size is None or config.model.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"{run_dir}: the model's vocab_size does not fit its tokenizer",
                              "put back the config.yaml and tokenizer/ it was trained with")
    ckpt = checkpoint_dir(run_dir, which)
    model = GPT(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(run_dir, config, tokenizer, model, ckpt, read_state(ckpt))

"""Loading a run for inference: its config, tokenizer and weights, all from its directory.

A LoRA run's checkpoints hold its adapters only; its base model is found where the
checkpoint's ``base`` record says (a run directory or a GPT-2 folder) and checked against
the sha256 of the weights it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import minigpt_tokenizers
from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.errors import CheckpointError, ConfigError, MiniGPTError
from minigpt_cli.model import lora
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run.checkpoint import TIED_KEYS, checkpoint_dir, load_weights, read_state
from minigpt_cli.run.layout import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    check_run_dir,
    find_latest_run,
    inside,
    is_run_dir,
)

BASE_HINT = "put the base model back as it was, or fine-tune it again"


def load_config(run_dir: Path) -> Config:
    try:
        return Config.from_file(inside(run_dir, run_dir / CONFIG_FILE)).validate()
    except ConfigError as e:
        raise CheckpointError(f"{run_dir} has an unusable config: {e}") from e


def load_tokenizer(run_dir: Path):
    """The run's tokenizer; ``minigpt_tokenizers.load`` keeps its files inside the folder."""
    try:
        return minigpt_tokenizers.load(inside(run_dir, run_dir / TOKENIZER_DIR))
    except minigpt_tokenizers.MissingPluginError as e:
        raise CheckpointError(e.message, e.hint) from e
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
    adapters: dict[str, torch.Tensor] | None = None  # a LoRA run's (merged into ``model``)


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
    state = read_state(ckpt)
    model = GPT(config.model)
    adapters = None
    if config.lora.enabled:  # the base, its adapters, then merged for inference
        model.load_state_dict(base_weights(run_dir, base_record(ckpt, state), config.model),
                              strict=False)
        lora.inject(model, config.lora)
        load_weights(model, ckpt)
        adapters = {k: v.detach().clone()
                    for k, v in lora.adapter_state(model.state_dict()).items()}
        lora.merge_and_unload(model)
    else:
        load_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(run_dir, config, tokenizer, model, ckpt, state, adapters)


def base_record(ckpt: Path, state: dict[str, Any]) -> dict[str, str]:
    """Where a LoRA checkpoint's base model is, and the sha256 of its weights."""
    base = state.get("base")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str)
                                             for k in ("path", "sha256")):
        raise CheckpointError(f"{ckpt} is a LoRA checkpoint that records no base model",
                              "restore it from a backup, or fine-tune again")
    return base


def base_weights(run_dir: Path, base: dict[str, str],
                 model: ModelConfig) -> dict[str, torch.Tensor]:
    """The base model of LoRA run ``run_dir`` (minigpt's names, the context of ``model``),
    checked against the weights it was trained on: missing or changed is a one-line error
    naming the base's path and what differs."""
    path = Path(base["path"])
    what = f"the base model of {run_dir}, {path},"
    if not path.exists():
        raise CheckpointError(f"{what} is missing", BASE_HINT)
    try:
        if is_run_dir(path):
            weights = {k: v for k, v in load_run(path).model.state_dict().items()
                       if k not in TIED_KEYS}
        else:
            from minigpt_cli.convert.hf import read_checkpoint

            weights = read_checkpoint(path).state_dict
    except MiniGPTError as e:
        raise CheckpointError(f"{what} cannot be loaded: {e.message}", BASE_HINT) from e
    wpe = weights.get("transformer.wpe.weight")
    if wpe is not None and wpe.size(0) > model.max_seq_length:  # the run's shorter context
        weights["transformer.wpe.weight"] = wpe[:model.max_seq_length].clone()
    digest = lora.fingerprint(weights)  # of the base as it is, before any new token's row
    if "vocab_size" in base:  # the run added tokens (its chat template's): their rows
        lora.grow_vocab_rows(weights, model.vocab_size)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(model).state_dict().items()
                    if k not in TIED_KEYS}
    for key, shape in expected.items():
        if key not in weights:
            raise CheckpointError(f"{what} changed: it has no {key}", BASE_HINT)
        if weights[key].shape != shape:
            raise CheckpointError(f"{what} changed: {key} has shape "
                                  f"{tuple(weights[key].shape)}, the run was trained on "
                                  f"{tuple(shape)}", BASE_HINT)
    if digest != base["sha256"]:
        raise CheckpointError(f"{what} changed: the sha256 of its weights is {digest[:12]}, "
                              f"the run was trained on {base['sha256'][:12]}", BASE_HINT)
    return weights

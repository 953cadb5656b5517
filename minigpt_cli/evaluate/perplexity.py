"""Held-out evaluation: the total negative log-likelihood of a token stream under a model.

Every token except the stream's first (which has no history) is scored exactly once.
By default the stream is cut into non-overlapping windows of the model's context, so a
token's history is whatever precedes it inside its window. With ``stride S`` the windows
slide by ``S`` tokens and only the tokens no earlier window scored are counted, so every
token after the first window has at least ``context - S`` tokens of history (the method of
Hugging Face's perplexity guide). ``stride == context`` is exactly the default.

Alongside the per-token loss and perplexity come two tokenizer-independent figures: bits
per byte of UTF-8 text and word-level perplexity, which let models with different
tokenizers be compared on the same text. No printing here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.device import Precision
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.fileio import atomic_write_text
from minigpt_cli.run.layout import EVAL_FILE

SYNC_EVERY = 32  # batches between reading the running loss back from the device

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class EvalResult:
    """What a model scored on a text. ``tokens`` counts the scored tokens."""

    total_nll: float  # nats, summed over the scored tokens
    tokens: int
    bytes: int | None = None  # UTF-8 bytes of the text, when known
    words: int | None = None  # whitespace-separated words of the text, when known

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.total_nll / self.tokens

    @property
    def perplexity(self) -> float:
        return _exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        if not self.bytes:
            return None
        return self.total_nll / (math.log(2) * self.bytes)

    @property
    def word_perplexity(self) -> float | None:
        if not self.words:
            return None
        return _exp(self.total_nll / self.words)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; a value too large for a float (or unknown) becomes None."""

        def finite(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "loss": finite(self.loss),
            "perplexity": finite(self.perplexity),
            "bits_per_byte": finite(self.bits_per_byte),
            "word_perplexity": finite(self.word_perplexity),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "words": self.words,
        }


@dataclass(frozen=True)
class Window:
    """Inputs ``tokens[start:end]``, targets ``tokens[start+1:end+1]``; the last
    ``scored`` targets count."""

    start: int
    end: int
    scored: int


def scoring_windows(num_tokens: int, seq_len: int, stride: int | None = None) -> Iterator[Window]:
    """The evaluation windows over a stream of ``num_tokens`` tokens.

    The targets of all windows' scored parts are positions 1 .. num_tokens-1, each once.
    """
    stride = seq_len if stride is None else stride
    assert 1 <= stride <= seq_len, "stride must be in [1, seq_len]"
    last = num_tokens - 1  # the last position that is a target
    scored_up_to = 0  # targets 1..scored_up_to are done
    start = 0
    while scored_up_to < last:
        end = min(start + seq_len, last)  # inputs start..end-1, targets start+1..end
        yield Window(start, end, end - scored_up_to)
        scored_up_to = end
        start += stride


def check_stride(stride: int | None, seq_len: int) -> None:
    if stride is not None and not 1 <= stride <= seq_len:
        raise MiniGPTError(f"stride must be between 1 and the model's context ({seq_len}), "
                           f"got {stride}",
                           "a stride of half the context is a common choice", setting="stride")


def _as_numpy(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().reshape(-1).numpy()
    return np.asarray(tokens).reshape(-1)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor, seq_len: int,
             batch_size: int, device: torch.device | str, precision: Precision,
             stride: int | None = None, progress: Progress | None = None, *,
             num_bytes: int | None = None, num_words: int | None = None) -> EvalResult:
    """Score ``tokens`` with ``model`` (``forward(idx, targets, reduction=...)``).

    ``seq_len`` is the window length (at most the model's context), ``stride`` the slide
    between windows (default ``seq_len``: non-overlapping). ``num_bytes`` and ``num_words``
    describe the text the tokens came from, for bits per byte and word perplexity.
    """
    device = torch.device(device)
    check_stride(stride, seq_len)
    if batch_size < 1:
        raise MiniGPTError(f"batch_size must be positive, got {batch_size}",
                           setting="batch_size")
    stream = _as_numpy(tokens)
    n = int(stream.shape[0])
    if n < 2:
        raise MiniGPTError(f"the text is too short to evaluate: {n} token(s)",
                           "a model is scored on predicting tokens after the first; "
                           "give a longer text")
    total_targets = n - 1
    was_training = model.training
    model.eval()
    total_nll, scored = 0.0, 0
    pending: list[torch.Tensor] = []  # batch sums still on the device: few host syncs

    def flush() -> float:
        total = float(torch.stack(pending).cpu().double().sum()) if pending else 0.0
        pending.clear()
        return total

    if progress:
        progress(0, total_targets)
    try:
        for batch in _batches(scoring_windows(n, seq_len, stride), batch_size):
            idx, targets = _tensors(stream, batch)
            with precision.autocast(device):
                _, loss = model(idx.to(device, non_blocking=True),
                                targets.to(device, non_blocking=True), reduction="sum")
            pending.append(loss.detach().float())
            if len(pending) == SYNC_EVERY:
                total_nll += flush()
            scored += sum(w.scored for w in batch)
            if progress:
                progress(scored, total_targets)
        total_nll += flush()
    finally:
        model.train(was_training)
    assert scored == total_targets, f"scored {scored} of {total_targets} tokens"
    return EvalResult(total_nll, scored, num_bytes, num_words)


@torch.inference_mode()
def evaluate_masked(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray,
                    seq_len: int, batch_size: int, device: torch.device | str,
                    precision: Precision, progress: Progress | None = None) -> EvalResult:
    """Score packed conversations (``data.chat.pack``): every row once, and only the
    targets ``mask`` marks (the assistant's tokens)."""
    from minigpt_cli.data.batches import batch_at

    device = torch.device(device)
    starts = np.arange((len(tokens) - 1) // seq_len, dtype=np.int64) * seq_len
    total = int(mask.sum())
    was_training = model.training
    model.eval()
    total_nll, scored = 0.0, 0
    if progress:
        progress(0, total)
    try:
        for i in range(0, len(starts), batch_size):
            idx, targets = batch_at(tokens, starts[i:i + batch_size], seq_len, mask)
            with precision.autocast(device):
                _, loss = model(idx.to(device), targets.to(device), reduction="sum")
            total_nll += float(loss.double())
            scored += int((targets != -1).sum())
            if progress:
                progress(scored, total)
    finally:
        model.train(was_training)
    if not scored:
        raise MiniGPTError("the conversations have no assistant tokens to score")
    return EvalResult(total_nll, scored)


def _batches(ws: Iterator[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group windows of the same length (only the last window can be shorter)."""
    batch: list[Window] = []
    for w in ws:
        if batch and (len(batch) == batch_size or
                      w.end - w.start != batch[0].end - batch[0].start):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _tensors(stream: np.ndarray, batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([stream[w.start:w.end + 1] for w in batch]).astype(np.int64)
    chunk = torch.from_numpy(rows)  # (B, T+1)
    idx = chunk[:, :-1]
    targets = chunk[:, 1:].clone()
    for i, w in enumerate(batch):
        targets[i, :targets.shape[1] - w.scored] = -1  # history only: not scored again
    return idx.contiguous(), targets


# ---- results on disk -------------------------------------------------------------------------

def result_key(dataset: str, split: str | None, stride: int | None) -> str:
    key = f"{dataset}:{split}" if split else dataset
    return f"{key}@stride={stride}" if stride else key


def record(run_dir: Path, key: str, entry: dict[str, Any]) -> Path:
    """Store ``entry`` under ``key`` in ``<run_dir>/eval.json``, replacing an older one."""
    path = Path(run_dir) / EVAL_FILE
    results: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                results = loaded
        except (OSError, ValueError):
            results = {}  # a corrupt file is replaced rather than blocking evaluation
    results[key] = {**entry, "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path, json.dumps(results, indent=1) + os.linesep)
    return path

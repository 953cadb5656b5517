"""Batches of context windows from a token array.

Training walks non-overlapping windows in a fresh random order each epoch, shifted by a
random offset per epoch so window boundaries move. The order depends only on the seed and
the epoch, and the sampler's whole state is how many windows it has handed out: a resumed
run sees exactly the batches the uninterrupted run would have seen.

In several processes every rank walks the same global order: each batch of the job is
``world_size`` consecutive batches of it, and rank ``r`` takes the ``r``-th. ``consumed``
counts windows of the whole job, so it is the same on every rank, and a job of W ranks with
batch B sees, step by step, the windows one process with batch W x B sees.
"""

from __future__ import annotations

import numpy as np
import torch


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, mask: np.ndarray | None = None):
        assert 0 <= rank < world_size
        assert len(tokens) > seq_len, "check_length() guards this"
        self.tokens = tokens
        self.mask = mask  # conversations: which tokens are targets (see data/chat.py)
        self.seq_len = seq_len
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.slack = (len(tokens) - 1) - self.n_windows * seq_len
        self.consumed = 0
        self._epoch = -1
        self._starts = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_windows

    def _starts_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.slack + 1))
            self._starts = offset + rng.permutation(self.n_windows) * self.seq_len
            self._epoch = epoch
        return self._starts

    def next_starts(self, batch_size: int) -> np.ndarray:
        out = np.empty(batch_size, dtype=np.int64)
        first = self.consumed + self.rank * batch_size  # this rank's share of the job's batch
        for i in range(batch_size):
            epoch, idx = divmod(first + i, self.n_windows)
            out[i] = self._starts_for(epoch)[idx]
        self.consumed += batch_size * self.world_size
        return out

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_at(self.tokens, self.next_starts(batch_size), self.seq_len, self.mask)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


def batch_at(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
             mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for windows starting at ``starts``;
    with ``mask``, targets where it is False are -1 (not scored)."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    block = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    x, y = block[:, :-1], block[:, 1:]
    if mask is not None:
        y = y.masked_fill(torch.from_numpy(~np.asarray(mask[idx[:, 1:]], dtype=bool)), -1)
    return x, y


def eval_starts(n_tokens: int, seq_len: int, count: int, rows: bool = False) -> np.ndarray:
    """``count`` fixed window starts spread evenly over a split (the same every evaluation);
    with ``rows``, starts of whole rows of ``seq_len`` (packed conversations)."""
    if rows:
        n_rows = (n_tokens - 1) // seq_len
        return np.unique(np.linspace(0, n_rows - 1, num=count).round().astype(np.int64)) \
            * seq_len
    last = n_tokens - seq_len - 1
    return np.unique(np.linspace(0, max(last, 0), num=count).round().astype(np.int64))

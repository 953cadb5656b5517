"""Decoding: sampling settings and the filters that turn next-token logits into a token.

The filters are pure functions on logits (..., V); ``sample_next`` applies them in order:
repetition penalty, then greedy or temperature, top-k, top-p, min-p and a draw.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from minigpt_cli.errors import MiniGPTError

REPETITION_WINDOW = 64  # the repetition penalty looks at this many most recent tokens
TOP_P_CANDIDATES = 1024  # top-p first tries the nucleus among this many best tokens
# A temperature below this decodes greedily (as vLLM does): dividing logits by less
# overflows float32, and the distribution is one token anyway
GREEDY_BELOW = 1e-5


@dataclass
class SamplingSettings:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style over the last REPETITION_WINDOW tokens
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    num_samples: int = 1

    def validate(self) -> SamplingSettings:
        """Raise a one-line MiniGPTError about the first bad value; it names the setting
        (``temperature``) and carries it as ``setting``."""
        problem = _first_problem(self)
        if problem:
            key, text = problem
            raise MiniGPTError(f"{key} {text}", setting=key)
        return self

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that sampling would pick the likeliest token."""
        return self.temperature < GREEDY_BELOW

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _first_problem(s: SamplingSettings) -> tuple[str, str] | None:
    checks = [
        ("max_new_tokens", s.max_new_tokens >= 1, "must be at least 1"),
        ("temperature", s.temperature >= 0, "must be >= 0 (0 means greedy)"),
        ("top_k", s.top_k >= 0, "must be >= 0 (0 turns it off)"),
        ("top_p", 0 < s.top_p <= 1, "must be in (0, 1] (1 turns it off)"),
        ("min_p", 0 <= s.min_p <= 1, "must be in [0, 1] (0 turns it off)"),
        ("repetition_penalty", s.repetition_penalty > 0, "must be > 0 (1 turns it off)"),
        ("num_samples", s.num_samples >= 1, "must be at least 1"),
    ]
    for key, ok, text in checks:
        value = getattr(s, key)
        if not ok or value != value:  # also rejects NaN
            return key, f"{text}, got {value}"
        if isinstance(value, float) and math.isinf(value):  # as the config and server do
            return key, f"must be a finite number, got {value}"
    if s.seed is not None and not 0 <= s.seed < 2**64:  # what torch's generator takes
        return "seed", f"must be between 0 and 2**64 - 1, got {s.seed}"
    if any(not isinstance(x, str) for x in s.stop):
        return "stop", "must be text"
    return None


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style: logits of tokens in ``recent`` (..., W) shrink towards 0 if positive
    (divided by ``penalty``) or grow more negative (multiplied) otherwise."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    score = logits.gather(-1, recent)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, recent, score)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    assert temperature >= GREEDY_BELOW, "greedy decoding is handled by the caller"
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (and any tied with the k-th); ``k`` = 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _nucleus_mask(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """For logits sorted descending: True where a token falls outside the nucleus."""
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs >= p  # the mass before it already reached p
    outside[..., 0] = False  # always keep the most likely token
    return outside


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    V = logits.size(-1)
    k = min(V, TOP_P_CANDIDATES)
    if k < V:  # sorting 50k logits is slow; the nucleus of a trained model is usually small
        top, order = torch.topk(logits, k, dim=-1)
        full_probs = logits.softmax(-1)
        head = full_probs.gather(-1, order)
        if bool((head.sum(-1) >= p).all()):
            probs = head
            outside = probs.cumsum(-1) - probs >= p
            outside[..., 0] = False
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, ~outside)
            return logits.masked_fill(~keep, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    outside = _nucleus_mask(sorted_logits, p)
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (..., V) by inverting the CDF; several times faster
    than ``torch.multinomial`` on a 50k vocabulary. Zero-probability tokens never win.
    ``draws`` (..., 1), uniform in [0, 1), are used instead of drawing from ``generator``."""
    cdf = probs.cumsum(-1)
    r = draws if draws is not None else torch.rand(
        cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = (1.0 - r) * cdf[..., -1:]  # in (0, total]: the first index with cdf >= u has mass
    return torch.searchsorted(cdf, u).squeeze(-1)


def filtered_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution sampling draws from: temperature, top-k, top-p and min-p applied
    to (B, V) float logits (not greedy settings)."""
    logits = apply_temperature(logits, settings.temperature)
    logits = top_k_filter(logits, settings.top_k)
    logits = top_p_filter(logits, settings.top_p)
    logits = min_p_filter(logits, settings.min_p)
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, settings: SamplingSettings,
                generator: torch.Generator | None = None,
                recent: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V): penalty, then greedy or filtered sampling."""
    logits = logits.float()
    if recent is not None:
        logits = apply_repetition_penalty(logits, recent, settings.repetition_penalty)
    if settings.greedy:
        return logits.argmax(-1)
    return sample_from(filtered_probs(logits, settings), generator)


def sample_rows(logits: torch.Tensor, settings: SamplingSettings,
                generators: list[torch.Generator]) -> torch.Tensor:
    """Next token of each row of ``logits`` (B, V), row b drawing from ``generators[b]``:
    the tokens ``sample_next(logits[b:b+1], settings, generators[b])`` gives, computed
    as one batch (requests decoded together, each with its own seed). Without top-p, whose
    shortcut depends on every row of a batch, so that a row's token never depends on the
    others."""
    assert settings.top_p >= 1.0, "top-p rows are sampled one at a time"
    logits = logits.float()
    if settings.greedy:
        return logits.argmax(-1)
    if len(generators) == 1:
        draws = torch.rand((1, 1), generator=generators[0], device=logits.device)
    else:
        draws = torch.cat([torch.rand((1, 1), generator=g, device=logits.device)
                           for g in generators])
    return sample_from(filtered_probs(logits, settings), draws=draws)

"""The generation engine: KV-cached decoding, sampling filters and streamed text.

``generate`` yields events: ``Notice`` (e.g. the prompt was cropped), ``TextDelta`` pieces
of each sample's text as soon as they are whole characters, ``SampleFinished`` when a
sample ends, and a final ``GenerationResult``. Several samples decode together as one
batch. The prompt is prefilled once; every new token then costs one cached forward step.
When the context fills up the window slides: the most recent half is prefilled again and
decoding goes on, so generation is never limited by the context length.

No printing here: the CLI renders the events.
"""

from __future__ import annotations

import codecs
import dataclasses
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.model import GPT, KVCache

REPETITION_WINDOW = 64  # the repetition penalty looks at this many most recent tokens
SMALL_STEP = 16  # a CPU step over at most this many (batch x new) tokens runs on one thread
TOP_P_CANDIDATES = 1024  # top-p first tries the nucleus among this many best tokens

# The CLI flag that sets each field, for error messages.
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty", "num_samples": "--num-samples",
         "seed": "--seed", "stop": "--stop"}


# ---- settings ---------------------------------------------------------------------------------

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

    def validate(self, names: dict[str, str] | None = None) -> SamplingSettings:
        """Raise a one-line MiniGPTError naming the flag (or ``names[field]``) of a bad value."""
        names = {**FLAGS, **(names or {})}
        problem = _first_problem(self)
        if problem:
            key, text = problem
            raise MiniGPTError(f"{names[key]} {text}")
        return self

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
    if s.seed is not None and not 0 <= s.seed < 2**64:  # what torch's generator takes
        return "seed", f"must be between 0 and 2**64 - 1, got {s.seed}"
    if any(not isinstance(x, str) for x in s.stop):
        return "stop", "must be text"
    return None


# ---- filters: pure functions on logits (..., V) -------------------------------------------------

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
    assert temperature > 0, "temperature 0 is greedy decoding, handled by the caller"
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


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (..., V) by inverting the CDF; several times faster
    than ``torch.multinomial`` on a 50k vocabulary. Zero-probability tokens never win."""
    cdf = probs.cumsum(-1)
    r = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device,
                   dtype=cdf.dtype)
    u = (1.0 - r) * cdf[..., -1:]  # in (0, total]: the first index with cdf >= u has mass
    return torch.searchsorted(cdf, u).squeeze(-1)


def sample_next(logits: torch.Tensor, settings: SamplingSettings,
                generator: torch.Generator | None = None,
                recent: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V): penalty, then greedy or filtered sampling."""
    logits = logits.float()
    if recent is not None:
        logits = apply_repetition_penalty(logits, recent, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(-1)
    logits = apply_temperature(logits, settings.temperature)
    logits = top_k_filter(logits, settings.top_k)
    logits = top_p_filter(logits, settings.top_p)
    logits = min_p_filter(logits, settings.min_p)
    return sample_from(logits.softmax(-1), generator)


# ---- the model behind a KV cache ----------------------------------------------------------------

class CachedLM:
    """Feed tokens, get next-token logits; one cached forward step per new token.

    ``window`` holds the tokens now in the cache. When appending would overflow the
    context, the cache restarts from the most recent ``keep`` tokens (half the context by
    default), prefilled again, so positions stay within the model's limit.
    """

    def __init__(self, model: GPT, batch_size: int, keep: int | None = None,
                 head: DecodingHead | None = None):
        self.model = model
        self.capacity = model.config.max_seq_length
        self.keep = min(self.capacity, keep or max(1, self.capacity // 2))
        self.head = head
        with torch.inference_mode():
            self.cache: KVCache = model.new_cache(batch_size)
            self.tokens = torch.zeros(batch_size, self.capacity, dtype=torch.long,
                                      device=model.lm_head.weight.device)
        self.slides = 0

    @property
    def window(self) -> torch.Tensor:
        return self.tokens[:, :self.cache.length]

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Start over from ``idx`` (1 or B, T), cropped from the left to the context.
        A single row is computed once and copied to every row of the batch."""
        idx = idx[:, -self.capacity:]
        self.cache.reset()
        logits = self._forward(idx)
        B, T = self.tokens.size(0), idx.size(1)
        if idx.size(0) == 1 and B > 1:
            for layer in self.cache.layers:
                layer.k[1:, :, :T] = layer.k[:1, :, :T]
                layer.v[1:, :, :T] = layer.v[:1, :, :T]
            self.tokens[1:, :T] = self.tokens[:1, :T]
            logits = logits.expand(B, -1)
        return logits

    @torch.inference_mode()
    def append(self, idx: torch.Tensor) -> torch.Tensor:
        """Continue every row with ``idx`` (B, T); logits (B, V) for the next token."""
        T = idx.size(1)
        if self.cache.length + T <= self.capacity:
            return self._forward(idx)
        self.slides += 1
        keep = max(0, self.keep - T)
        context = torch.cat([self.window[:, self.cache.length - keep:], idx], dim=1)
        self.cache.reset()
        return self._forward(context[:, -self.capacity:])

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Only the last position's logits are needed, and the head is most of the cost.
        B, T = idx.shape
        start = self.cache.length
        self.tokens[:B, start:start + T] = idx
        with one_thread(idx.device.type == "cpu" and B * T <= SMALL_STEP):
            x = self.model.features(idx, self.cache)[:, -1]  # (B, C)
        if self.head is not None:
            return self.head(x)  # (B, V)
        return F.linear(x, self.model.lm_head.weight)


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch's CPU operators on one thread for a while (torch's setting is global).

    A decoding step through the layers is dozens of tiny operators; waking a second thread
    for each costs more than it saves, and stalls every one of them for milliseconds when
    another process keeps the other cores busy (a 10x slower step on a shared 2-core
    machine). The output head, one large matrix product, keeps all threads.
    """
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DecodingHead:
    """The output head for the one position per row that decoding needs.

    On the CPU, the head (V x C, the largest matrix by far) is read once per token, so
    its layout and size decide the speed. ``quantize`` keeps an int8 copy with one scale
    per vocabulary row (weight-only quantisation, as llama.cpp's q8): a quarter of the
    memory traffic, about 9x faster than fp32 here, logits within about 1% of the exact
    ones. Without it (or where the int8 kernel is missing), an exact fp32 copy in (C, V)
    layout is used, about twice as fast as the model's own (V, C) one. Elsewhere the
    model's own weights are used as they are.
    """

    def __init__(self, model: GPT, quantize: bool = True):
        w = model.lm_head.weight
        self.weight = w
        self.mode = "model"
        if w.device.type != "cpu":
            return
        with torch.inference_mode():
            w = w.detach().float()
            if quantize and hasattr(torch, "_weight_int8pack_mm"):
                scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
                self.q = torch.round(w / scales[:, None]).to(torch.int8).contiguous()
                self.scales = scales.to(torch.bfloat16)
                try:  # the kernel is CPU- and build-dependent: check it once
                    self(torch.zeros(1, w.size(1)))
                    self.mode = "int8"
                    return
                except RuntimeError:
                    pass
            self.t = w.t().contiguous()
            self.mode = "fp32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) hidden states -> (B, V) fp32 logits."""
        if self.mode == "int8":
            return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q,
                                             self.scales).float()
        if self.mode == "fp32":
            return x @ self.t
        return F.linear(x, self.weight)


# ---- text that never splits a character ------------------------------------------------

class TextStream:
    """Token ids in, text out as soon as it is whole characters; ``push``es plus ``flush``
    equal ``tokenizer.decode`` of all the tokens.

    With ``decode_bytes``, an incremental UTF-8 decoder says whether the bytes so far end
    inside a character. The text itself comes from the tokenizer's ``decode`` of the tokens
    since the last character boundary (with the token before them as left context, for
    decoders that treat a first token specially, like a SentencePiece dummy prefix), so
    invalid bytes become U+FFFD just as ``decode`` has them; while a character is unfinished
    the U+FFFD standing for its bytes so far is held back. Without ``decode_bytes``, all the
    tokens are decoded again and the part that has settled (no trailing U+FFFD) is released.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decode_bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # the tokens since the last boundary (and the one before)
        self._context = 0  # 1 when self._ids starts with the token before the boundary
        self._released = 0  # characters of the text of self._ids already returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._decode_bytes is None:
            return self._release(self.tokenizer.decode(self._ids), boundary=False)
        self._utf8.decode(self._decode_bytes([token_id]))
        unfinished = bool(self._utf8.getstate()[0])
        return self._release(self._text(), boundary=not unfinished)

    def flush(self) -> str:
        if self._decode_bytes is None:
            text = self.tokenizer.decode(self._ids)
        else:
            self._utf8.reset()
            text = self._text()
        out = text[self._released:]
        self._released += len(out)
        return out

    def _text(self) -> str:
        text = self.tokenizer.decode(self._ids)
        if self._context:
            text = text[len(self.tokenizer.decode(self._ids[:1])):]
        return text

    def _release(self, text: str, boundary: bool) -> str:
        if not boundary:
            text = text.rstrip("\ufffd")  # perhaps an unfinished character: wait
        out = text[self._released:]
        self._released = max(self._released, len(text))
        if boundary:
            self._ids, self._context, self._released = self._ids[-1:], 1, 0
        return out


class StopFilter:
    """Cuts text at the first stop string; holds back text that could begin one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to release, and whether a stop string was found (it is not released)."""
        if not self.stops:
            return text, False
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[:min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        self._pending = pending[len(pending) - hold:]
        return pending[:len(pending) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


# ---- events --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Notice:
    """Something the user should know, e.g. that the prompt was cropped."""

    message: str


@dataclass(frozen=True)
class TextDelta:
    sample: int
    text: str


@dataclass(frozen=True)
class SampleFinished:
    sample: int
    finish_reason: str  # eot | stop | length
    num_tokens: int


@dataclass
class SampleResult:
    text: str
    tokens: list[int]  # new tokens, end-of-text excluded
    finish_reason: str  # eot | stop | length


@dataclass
class GenerationResult:
    samples: list[SampleResult]
    prompt_tokens: int  # after cropping
    prompt_cropped: bool
    warnings: list[str]
    seed: int  # the seed actually used: pass it back to reproduce the samples
    generated_tokens: int  # sampled over all samples, end-of-text included
    time_to_first_token: float  # seconds from the call to the first sampled token
    elapsed: float  # seconds for the whole call

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.elapsed if self.elapsed > 0 else 0.0


Event = Notice | TextDelta | SampleFinished | GenerationResult


class _Sample:
    """One row of the batch: its tokens, text so far and stopping state."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.stream = TextStream(tokenizer)
        self.stop = StopFilter(stops)
        self.tokens: list[int] = []
        self.parts: list[str] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> tuple[str, bool]:
        self.tokens.append(token)
        text, stopped = self.stop.push(self.stream.push(token))
        self.parts.append(text)
        return text, stopped

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        tail = "" if reason == "stop" else self._drain()
        self.parts.append(tail)
        return tail

    def _drain(self) -> str:
        text, stopped = self.stop.push(self.stream.flush())
        return text if stopped else text + self.stop.flush()


# ---- the engine ----------------------------------------------------------------------------------

class Engine:
    """A model and its tokenizer, ready to generate; keep one around to reuse its setup.

    The model should be in eval mode. On the CPU the engine keeps a copy of the output
    head, int8 unless ``exact_head`` (see ``DecodingHead``): make a new engine after the
    weights change.
    """

    def __init__(self, model: GPT, tokenizer, device: torch.device | str | None = None,
                 exact_head: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else \
            model.lm_head.weight.device
        self.context_length = model.config.max_seq_length
        self.head = DecodingHead(model, quantize=not exact_head)
        extra = model.config.vocab_size - tokenizer.vocab_size
        self._vocab_limit = tokenizer.vocab_size if extra > 0 else None

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return ids or [self.tokenizer.eot_id]  # nothing to continue: start a new document

    def generate(self, prompt: str | Sequence[int],
                 settings: SamplingSettings) -> Iterator[Event]:
        settings.validate()
        t0 = time.perf_counter()
        ids = self.encode_prompt(prompt)
        warnings = []
        cropped = len(ids) > self.context_length
        if cropped:
            warnings.append(f"the prompt has {len(ids)} tokens; only the last "
                            f"{self.context_length} (the model's context) are used")
            ids = ids[-self.context_length:]
        for w in warnings:
            yield Notice(w)

        B = settings.num_samples
        # torch's default generator starts from a fixed seed in every process: ask the OS
        seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        lm = CachedLM(self.model, B, head=self.head)
        samples = [_Sample(self.tokenizer, settings.stop) for _ in range(B)]
        with torch.inference_mode():
            prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
            # the most recent tokens of every row, for the repetition penalty
            recent = prompt[:, -REPETITION_WINDOW:].expand(B, -1) \
                if settings.repetition_penalty != 1.0 else None
        logits = lm.prefill(prompt)

        eot, generated, ttft = self.tokenizer.eot_id, 0, None
        for step in range(settings.max_new_tokens):
            nxt = self._sample(logits, settings, gen, recent)
            if recent is not None:
                with torch.inference_mode():
                    recent = torch.cat([recent, nxt[:, None]], dim=1)[:, -REPETITION_WINDOW:]
            tokens = nxt.tolist()
            if ttft is None:
                ttft = time.perf_counter() - t0
            for i, s in enumerate(samples):
                if s.finish_reason is not None:
                    continue
                generated += 1
                if tokens[i] == eot:
                    yield from self._finish(i, s, "eot")
                    continue
                text, stopped = s.push(tokens[i])
                if text:
                    yield TextDelta(i, text)
                if stopped:
                    yield from self._finish(i, s, "stop")
            if all(s.finish_reason is not None for s in samples):
                break
            if step + 1 < settings.max_new_tokens:
                logits = lm.append(nxt[:, None])
        for i, s in enumerate(samples):
            if s.finish_reason is None:
                yield from self._finish(i, s, "length")

        elapsed = time.perf_counter() - t0
        yield GenerationResult(
            samples=[SampleResult("".join(s.parts), s.tokens, s.finish_reason) for s in samples],
            prompt_tokens=len(ids), prompt_cropped=cropped, warnings=warnings, seed=seed,
            generated_tokens=generated, time_to_first_token=ttft or elapsed, elapsed=elapsed)

    @torch.inference_mode()
    def _sample(self, logits, settings, gen, recent) -> torch.Tensor:
        if self._vocab_limit is not None:  # never sample ids the tokenizer cannot decode
            logits = logits[..., :self._vocab_limit]
        # a few passes over one row of logits: too small to be worth a second thread
        with one_thread(logits.device.type == "cpu" and logits.size(0) <= SMALL_STEP):
            return sample_next(logits, settings, gen, recent)

    @staticmethod
    def _finish(i: int, sample: _Sample, reason: str) -> Iterator[Event]:
        tail = sample.finish(reason)
        if tail:
            yield TextDelta(i, tail)
        yield SampleFinished(i, reason, len(sample.tokens))


def generate(model: GPT, tokenizer, prompt: str | Sequence[int], settings: SamplingSettings,
             device: torch.device | str | None = None) -> Iterator[Event]:
    """Stream events for ``settings.num_samples`` continuations of ``prompt``."""
    return Engine(model, tokenizer, device).generate(prompt, settings)


def complete(model: GPT, tokenizer, prompt: str | Sequence[int], settings: SamplingSettings,
             device: torch.device | str | None = None) -> list[str]:
    """The generated text of every sample, without streaming."""
    result = None
    for event in generate(model, tokenizer, prompt, settings, device):
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None
    return [s.text for s in result.samples]

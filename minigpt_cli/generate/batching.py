"""Continuous batching: many requests decoded together, one forward step for all of them.

A ``Scheduler`` owns one KV cache of ``max_batch`` rows and a thread that loops: drop the
rows whose client went away, admit waiting requests into free rows (each prompt is
prefilled alone, then its keys and values are copied into its rows), then one decoding
step for every active row, each at its own position (``KVCache.lengths``). Finished rows
leave between steps; the rows stay packed at the top of the cache (the last row moves into
a hole), so a step only ever computes the rows in use. A row whose context is full slides
as the engine's ``CachedLM`` does: its most recent half is prefilled again, alone, and it
goes on decoding with the others.

A request reports through the ``emit`` callback it was submitted with, from the
scheduler's thread: ``Started`` once its prompt is in, ``Token`` for every sampled token,
``SampleFinished`` per sample, then ``Done``, or ``Failed`` instead. No printing here.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.cache import SMALL_STEP, decoding_layout, one_thread
from minigpt_cli.generate.decoding import (
    REPETITION_WINDOW,
    SamplingSettings,
    sample_next,
    sample_rows,
)
from minigpt_cli.generate.engine import SampleFinished, _Sample
from minigpt_cli.generate.quant import DecodingHead
from minigpt_cli.model.gpt import GPT


class QueueFull(MiniGPTError):
    """Every row is busy and the waiting line is full: try again later."""


@dataclass
class BatchRequest:
    prompt: list[int]
    settings: SamplingSettings  # num_samples rows decode for it; max_new_tokens may be 0
    logprobs: int | None = None  # report each token's log-probability and this many top ones
    echo: bool = False  # also report the prompt's tokens (and their log-probs with logprobs)
    frequency_penalty: float = 0.0  # OpenAI's: logit -= f * count + p * (count > 0)
    presence_penalty: float = 0.0
    stop_ids: tuple[int, ...] = ()  # besides end-of-text: a chat template's end of turn
    reply: bool = False  # a chat reply: whitespace-only stops count after its first text
    reply_prefix: str = ""  # left out of a reply's text (the space of "Assistant: Hi")
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling


@dataclass(frozen=True)
class TokenInfo:
    token: int
    logprob: float | None = None  # None: not asked for, or the first prompt token
    top: dict[int, float] | None = None


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    prompt: list[TokenInfo] | None  # with echo: the prompt's tokens


@dataclass(frozen=True)
class Token:
    sample: int
    info: TokenInfo
    text: str  # the text this token releases (may be empty: half a character, a stop's start)


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    reason: str  # timeout | shutdown | error
    message: str


Emit = Callable[[object], None]


@dataclass(eq=False)
class Handle:
    """A submitted request; ``cancel()`` frees its rows before the next step."""

    request: BatchRequest
    emit: Emit
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    completion_tokens: int = 0
    rows_left: int = 0

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """One sequence in the batch: its request, sample index, sampler and stopping state."""

    def __init__(self, handle: Handle, sample: int, tokenizer, seed: int, length: int,
                 device):
        s = handle.request.settings
        self.handle, self.sample, self.length = handle, sample, length
        self.text = _Sample(tokenizer, s.stop, handle.request.reply,
                            handle.request.reply_prefix)
        self.gen = torch.Generator(device=device).manual_seed(seed + sample)
        self.next_token = -1
        self.generated = 0
        self.window = list(handle.request.prompt)  # the tokens in this row's cache
        prompt = torch.tensor(handle.request.prompt, dtype=torch.long, device=device)
        self.recent = prompt[-REPETITION_WINDOW:][None] if s.repetition_penalty != 1.0 \
            else None
        self.counts = None
        if handle.request.frequency_penalty or handle.request.presence_penalty:
            self.counts = torch.zeros(tokenizer.vocab_size, device=device)
        self.bias = None  # (token ids, their biases)
        if handle.request.logit_bias:
            bias = handle.request.logit_bias
            self.bias = (torch.tensor(list(bias), dtype=torch.long, device=device),
                         torch.tensor([list(bias.values())], device=device))


def _take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]`` for increasing ``rows``, without the copy when they are all of ``t``."""
    return t if len(rows) == t.size(0) else t[rows]


class Scheduler:
    """Continuous batching over ``model``; ``submit`` requests from any thread.

    It decodes in a thread of its own, or with ``start=False`` in the thread that calls
    ``run`` (the main thread of a server: PyTorch's CPU kernels are measurably faster in
    the thread that loaded the model than in one started later, 5-10% on two cores).
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 queue_timeout: float = 60.0, exact_head: bool = False, start: bool = True):
        if max_batch < 1:
            raise MiniGPTError(f"max_batch must be at least 1, got {max_batch}",
                               setting="max_batch")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.capacity = model.config.max_seq_length
        self.keep = max(1, self.capacity // 2)  # tokens a full row keeps when it slides
        self.device = model.lm_head.weight.device
        decoding_layout(model)  # in place, as the engine does
        self.exact = DecodingHead(model, quantize=False)
        self.head = self.exact if exact_head else DecodingHead(model, quantize=True)
        self.vocab = tokenizer.vocab_size
        with torch.inference_mode():
            self.cache = model.new_cache(max_batch)
            self.scratch = model.new_cache(1)
        self.rows: list[_Row] = []
        self.waiting: deque[Handle] = deque()
        self.steps = 0
        self.slides = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self.run, name="minigpt-scheduler",
                                            daemon=True)
            self._thread.start()

    # ---- the API ---------------------------------------------------------------------------

    def submit(self, request: BatchRequest, emit: Emit) -> Handle:
        n = request.settings.num_samples
        if n > self.max_batch:
            raise MiniGPTError(f"n must be at most {self.max_batch} (the batch size), got {n}",
                               setting="n")
        assert 1 <= len(request.prompt) <= self.capacity, "the caller checks the prompt"
        handle = Handle(request, emit)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.rows)} sequences are decoding and "
                                f"{len(self.waiting)} requests wait: try again shortly")
            self.waiting.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        with self._cond:
            handle.cancel()
            self._cond.notify()

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Fail every request still waiting or decoding and stop decoding (``run``
        returns; the scheduler's own thread is waited for)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Decode until ``close``: what the scheduler's thread does, or, with
        ``start=False``, the caller's."""
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.rows:
                    self._cond.wait()
                if self._stopping:
                    break
                admit = self._take_admissible()
            try:
                self._drop_cancelled()
                for handle in admit:
                    self._admit(handle)
                if self.rows:
                    self._step()
            except Exception as e:  # never leave a client hanging: fail what was in flight
                for handle in {r.handle for r in self.rows} | set(admit):
                    self._fail(handle, "error", f"generation failed: {e}")
                self.rows.clear()
                self.cache.reset()  # the next requests start from a clean cache
        for handle in [*{r.handle for r in self.rows}, *self.waiting]:
            self._fail(handle, "shutdown", "the server is shutting down")
        self.rows.clear()
        self.waiting.clear()

    def _take_admissible(self) -> list[Handle]:
        """Waiting requests that fit in the free rows now; time out those waiting too long."""
        now, free, out = time.monotonic(), self.max_batch - len(self.rows), []
        while self.waiting:
            handle = self.waiting[0]
            if handle.cancelled:
                self.waiting.popleft()
                handle.finished = True
            elif now - handle.submitted > self.queue_timeout:
                self.waiting.popleft()
                self._fail(handle, "timeout", f"the request waited {self.queue_timeout:g} s "
                           "for a free batch slot")
            elif handle.request.settings.num_samples <= free:
                free -= handle.request.settings.num_samples
                out.append(self.waiting.popleft())
            else:
                break
        return out

    def _fail(self, handle: Handle, reason: str, message: str) -> None:
        if not handle.finished:
            handle.finished = True
            handle.emit(Failed(reason, message))

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].handle.cancelled:
                self._remove(i)

    @torch.inference_mode()
    def _remove(self, i: int) -> None:
        """Row i leaves; the last row moves into its place so the active rows stay packed."""
        last = len(self.rows) - 1
        if i != last:
            n = self.rows[last].length
            for layer in self.cache.layers:
                layer.k[i, :, :n] = layer.k[last, :, :n]
                layer.v[i, :, :n] = layer.v[last, :, :n]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    @torch.inference_mode()
    def _admit(self, handle: Handle) -> None:
        if handle.cancelled:
            handle.finished = True
            return
        req = handle.request
        T, n = len(req.prompt), req.settings.num_samples
        idx = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        self.scratch.reset()
        with one_thread(self.device.type == "cpu" and T <= SMALL_STEP):
            x = self.model.features(idx, self.scratch)[0]  # (T, C)
        prompt_info = None
        if req.echo:
            prompt_info = [TokenInfo(req.prompt[0])]
            if req.logprobs is not None:
                logp = self._log_softmax(self.exact(x[:-1]))
                prompt_info += [self._info(logp[t], req.prompt[t + 1], req.logprobs)
                                for t in range(T - 1)]
            else:
                prompt_info += [TokenInfo(t) for t in req.prompt[1:]]
        handle.emit(Started(T, prompt_info))
        if req.settings.max_new_tokens == 0:
            handle.finished = True
            handle.emit(Done(T, 0))
            return
        first = len(self.rows)
        for layer, src in zip(self.cache.layers, self.scratch.layers, strict=True):
            layer.k[first:first + n, :, :T] = src.k[:1, :, :T]
            layer.v[first:first + n, :, :T] = src.v[:1, :, :T]
        seed = req.settings.seed if req.settings.seed is not None else secrets.randbelow(2**31)
        rows = [_Row(handle, i, self.tokenizer, seed, T, self.device) for i in range(n)]
        handle.rows_left = n
        self.rows.extend(rows)
        self._sample(rows, x[-1:].expand(n, -1))

    @torch.inference_mode()
    def _slide(self, i: int) -> None:
        """Row i's context is full: start it again from its most recent ``keep - 1`` tokens,
        so that with the token the next step feeds it holds ``keep``."""
        r = self.rows[i]
        r.window = r.window[len(r.window) - (self.keep - 1):] if self.keep > 1 else []
        r.length = len(r.window)
        if not r.window:
            return
        self.scratch.reset()
        idx = torch.tensor([r.window], dtype=torch.long, device=self.device)
        with one_thread(self.device.type == "cpu" and r.length <= SMALL_STEP):
            self.model.features(idx, self.scratch)
        for layer, src in zip(self.cache.layers, self.scratch.layers, strict=True):
            layer.k[i, :, :r.length] = src.k[0, :, :r.length]
            layer.v[i, :, :r.length] = src.v[0, :, :r.length]
        self.slides += 1

    @torch.inference_mode()
    def _step(self) -> None:
        for i, r in enumerate(self.rows):
            if r.length >= self.capacity:
                self._slide(i)
        B = len(self.rows)
        idx = torch.tensor([[r.next_token] for r in self.rows], dtype=torch.long,
                           device=self.device)
        lengths = [r.length for r in self.rows]
        if len(set(lengths)) == 1:  # every row at one position (one stream, say): no mask
            self.cache.length = lengths[0]
        else:
            self.cache.lengths = torch.tensor(lengths, device=self.device)
        try:
            with one_thread(self.device.type == "cpu" and B <= SMALL_STEP):
                x = self.model.features(idx, self.cache)[:, -1]  # (B, C)
        finally:  # per-row lengths are this step's alone, even when it fails
            self.cache.lengths = None
        for r in self.rows:
            r.length += 1
            r.window.append(r.next_token)
        self.steps += 1
        self._sample(list(self.rows), x)

    def _sample(self, rows: list[_Row], x: torch.Tensor) -> None:
        """Sample the next token of each of ``rows`` from its hidden state in ``x`` (B, C)."""
        exact = [i for i, r in enumerate(rows) if self._needs_exact(r)]
        logits = self.head(x) if len(exact) < len(rows) else None
        if exact:
            exact_logits = self.exact(x[exact])
            logits = exact_logits if logits is None else logits.index_copy(
                0, torch.tensor(exact, device=x.device), exact_logits)
        logits = logits[:, :self.vocab]
        live = [i for i, r in enumerate(rows) if not r.handle.cancelled]
        # a few passes over one row of logits: one thread; over several, all threads
        with one_thread(logits.device.type == "cpu" and len(live) <= 1):
            tokens = self._draw([rows[i] for i in live], _take_rows(logits, live))
        for r in rows:
            r.next_token = -1
        for i, token in zip(live, tokens, strict=True):
            self._advance(rows[i], token, logits[i:i + 1])
        for i in reversed(range(len(self.rows))):
            if self.rows[i].next_token < 0:
                self._remove(i)

    def _draw(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of every row: rows with the same settings and no penalties or
        biases in one batch (each with its own generator, so a row's tokens never depend on
        the others), the rest one by one."""
        tokens: list[int | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            req, s = r.handle.request, r.handle.request.settings
            if r.recent is None and r.counts is None and r.bias is None and s.top_p >= 1.0:
                groups.setdefault((s.temperature, s.top_k, s.min_p), []).append(i)
                continue
            row = logits[i:i + 1]
            if r.counts is not None:  # OpenAI's penalties, over this row's generated tokens
                row = row - req.frequency_penalty * r.counts \
                    - req.presence_penalty * (r.counts > 0).float()
            if r.bias is not None:  # OpenAI's logit_bias
                row = row.index_add(1, *r.bias)
            tokens[i] = int(sample_next(row, s, r.gen, r.recent)[0])
        for members in groups.values():
            settings = rows[members[0]].handle.request.settings
            picked = sample_rows(_take_rows(logits, members), settings,
                                 [rows[i].gen for i in members])
            for i, token in zip(members, picked.tolist(), strict=True):
                tokens[i] = token
        return tokens

    def _needs_exact(self, r: _Row) -> bool:
        return r.handle.request.logprobs is not None or r.handle.request.settings.greedy

    def _advance(self, r: _Row, token: int, logits: torch.Tensor) -> None:
        """Report row r's next token (sampled from ``logits`` (1, V)) and see whether the
        row is done."""
        handle, req = r.handle, r.handle.request
        s = req.settings
        if r.recent is not None:
            r.recent = torch.cat([r.recent, torch.tensor([[token]], device=r.recent.device)],
                                 dim=1)[:, -REPETITION_WINDOW:]
        if r.counts is not None:
            r.counts[token] += 1
        r.generated += 1
        handle.completion_tokens += 1
        info = self._info(self._log_softmax(logits)[0], token, req.logprobs) \
            if req.logprobs is not None else TokenInfo(token)
        reason = None
        if token == self.tokenizer.eot_id or token in req.stop_ids:
            handle.emit(Token(r.sample, info, r.text.finish("eot")))
            reason = "stop"
        else:
            text, stopped = r.text.push(token)
            if stopped:
                reason = "stop"
                r.text.finish("stop")
            elif r.generated >= s.max_new_tokens:
                reason = "length"
                text += r.text.finish("length")
            handle.emit(Token(r.sample, info, text))
        if reason is None:
            r.next_token = token
            return
        handle.emit(SampleFinished(r.sample, reason, r.generated))
        handle.rows_left -= 1
        if handle.rows_left == 0:
            handle.finished = True
            handle.emit(Done(len(req.prompt), handle.completion_tokens))

    @staticmethod
    def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def _info(self, logp: torch.Tensor, token: int, top: int | None) -> TokenInfo:
        logp = logp[:self.vocab]
        best = {}
        if top:
            values, ids = torch.topk(logp, min(top, logp.numel()))
            best = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenInfo(token, float(logp[token]), best)

"""The generation engine: a model and its tokenizer, ready to generate.

``Engine.generate`` yields events: ``Notice`` (e.g. the prompt was cropped), ``TextDelta`` pieces
of each sample's text as soon as they are whole characters, ``SampleFinished`` when a
sample ends, and a final ``GenerationResult``. Several samples decode together as one
batch. The prompt is prefilled once; every new token then costs one cached forward step.
When the context fills up the window slides: the most recent half is prefilled again and
decoding goes on, so generation is never limited by the context length.

No printing here: the CLI renders the events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from minigpt_cli.device import available_memory
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.cache import CachedLM, decoding_layout, one_thread
from minigpt_cli.generate.decoding import (
    REPETITION_WINDOW,
    SamplingSettings,
    sample_next,
    sample_rows,
)
from minigpt_cli.generate.quant import DecodingHead
from minigpt_cli.generate.text import StopFilter, TextStream
from minigpt_cli.model.gpt import GPT

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

    def __init__(self, tokenizer, stops: Sequence[str], reply: bool = False, prefix: str = ""):
        self.stream = TextStream(tokenizer)
        self.stop = StopFilter(stops, reply)
        self.tokens: list[int] = []
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.prefix = prefix  # dropped from the start of the text (a template's, say)

    def push(self, token: int) -> tuple[str, bool]:
        self.tokens.append(token)
        text, stopped = self.stop.push(self.stream.push(token))
        return self._keep(text), stopped

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self._keep("" if reason == "stop" else self._drain())

    def _keep(self, text: str) -> str:
        if text and self.prefix is not None:  # the first text: without the prefix
            text, self.prefix = text.removeprefix(self.prefix), None
        self.parts.append(text)
        return text

    def _drain(self) -> str:
        text, stopped = self.stop.push(self.stream.flush())
        return text if stopped else text + self.stop.flush()


# ---- the engine ----------------------------------------------------------------------------------

class Engine:
    """A model and its tokenizer, ready to generate; keep one around to reuse its setup.

    The model should be in eval mode. On the CPU the engine keeps a copy of the output
    head, int8 unless ``exact_head`` (see ``DecodingHead``); greedy decoding always uses
    an exact one. It also lays the model's layers out for decoding, in place with the
    values unchanged (see ``decoding_layout``). Make a new engine after the weights
    change.
    """

    def __init__(self, model: GPT, tokenizer, device: torch.device | str | None = None,
                 exact_head: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else \
            next(model.parameters()).device
        self.context_length = model.config.max_seq_length
        decoding_layout(model)
        self.head = DecodingHead(model, quantize=not exact_head)
        self._exact_head = self.head if self.head.exact else None
        extra = model.config.vocab_size - tokenizer.vocab_size
        self._vocab_limit = tokenizer.vocab_size if extra > 0 else None

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return ids or [self.tokenizer.eot_id]  # nothing to continue: start a new document

    def generate(self, prompt: str | Sequence[int], settings: SamplingSettings,
                 stop_ids: Sequence[int] = (), reply: bool = False,
                 reply_prefix: str = "") -> Iterator[Event]:
        """Stream events for ``prompt``; a sample ends at end-of-text or any of ``stop_ids``
        (a chat template's end of turn), which are not part of its text. ``reply``: the
        samples are chat replies (see ``StopFilter``), whose text starts after
        ``reply_prefix`` (the space of "Assistant: Hi", say)."""
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
        self.check_memory(B)
        # torch's default generator starts from a fixed seed in every process: ask the OS
        seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
        # row i draws from a generator of its own seeded seed + i, as the server's rows do,
        # so that `--seed` gives the server's samples and a row never depends on the others
        gens = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(B)]
        lm = CachedLM(self.model, B, head=self._head_for(settings))
        samples = [_Sample(self.tokenizer, settings.stop, reply, reply_prefix)
                   for _ in range(B)]
        with torch.inference_mode():
            prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
            # the most recent tokens of every row, for the repetition penalty
            recent = prompt[:, -REPETITION_WINDOW:].expand(B, -1) \
                if settings.repetition_penalty != 1.0 else None
        logits = lm.prefill(prompt)

        ends, generated, ttft = {self.tokenizer.eot_id, *stop_ids}, 0, None
        for step in range(settings.max_new_tokens):
            nxt = self._sample(logits, settings, gens, recent)
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
                if tokens[i] in ends:
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

    def check_memory(self, rows: int) -> None:
        """A MiniGPTError (setting ``num_samples``) when ``rows`` samples at once would need
        more memory than the CPU's system has free: Linux would kill the process, with no
        word, rather than fail the allocation."""
        if self.device.type != "cpu" or rows == 1:
            return
        cfg = self.model.config
        per_row = (cfg.num_layers * 2 * cfg.kv_heads * cfg.max_seq_length * cfg.head_dim * 4
                   + 4 * cfg.vocab_size * 4 + cfg.max_seq_length * 8)  # cache, logits, ids
        free = available_memory()
        if free is not None and rows * per_row > free:
            fit = max(1, free // per_row)
            raise MiniGPTError(f"num_samples of {rows:,} would need about "
                               f"{rows * per_row / 2**30:.1f} GiB at once, more than the "
                               f"{free / 2**30:.1f} GiB of memory free",
                               f"ask for at most {fit:,}", setting="num_samples")

    def _head_for(self, settings: SamplingSettings) -> DecodingHead:
        """Greedy decoding takes the exact head: its argmax must be the model's own (as in
        transformers or llama.cpp), where int8 logits could flip a near tie."""
        if not settings.greedy:
            return self.head
        if self._exact_head is None:
            self._exact_head = DecodingHead(self.model, quantize=False)
        return self._exact_head

    @torch.inference_mode()
    def _sample(self, logits, settings, gens, recent) -> torch.Tensor:
        """The next token of every row, row i drawing from ``gens[i]``: as the scheduler
        draws them (``sample_rows`` in one batch, one row at a time with a penalty or
        top-p, whose shortcut depends on every row of a batch)."""
        if self._vocab_limit is not None:  # never sample ids the tokenizer cannot decode
            logits = logits[..., :self._vocab_limit]
        # a few passes over one row of logits: too small to be worth a second thread
        with one_thread(logits.device.type == "cpu" and logits.size(0) == 1):
            if len(gens) == 1:
                return sample_next(logits, settings, gens[0], recent)
            if recent is None and settings.top_p >= 1.0:
                return sample_rows(logits, settings, gens)
            return torch.cat([sample_next(logits[i:i + 1], settings, g,
                                          None if recent is None else recent[i:i + 1])
                              for i, g in enumerate(gens)])

    @staticmethod
    def _finish(i: int, sample: _Sample, reason: str) -> Iterator[Event]:
        tail = sample.finish(reason)
        if tail:
            yield TextDelta(i, tail)
        yield SampleFinished(i, reason, len(sample.tokens))

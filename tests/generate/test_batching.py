"""Continuous batching: rows at different positions decode together exactly as alone."""

import queue

import pytest
import torch

from minigpt_cli.generate.batching import (
    BatchRequest,
    Done,
    Failed,
    QueueFull,
    Scheduler,
    Started,
    Token,
)
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine

VARIANTS = {"gpt2": {}, "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu",
                                       num_kv_heads=1, bias=False)}


@torch.inference_mode()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rows_at_different_positions_give_the_logits_of_each_alone(toy_gpt, one_thread,
                                                                  variant):
    model = toy_gpt(seed=3, **VARIANTS[variant])  # rotary angles and kv heads per row too
    prompts = [torch.randint(0, 256, (1, n)) for n in (3, 9, 5)]
    alone = []
    for p in prompts:  # each prompt alone: its own cache, one token at a time
        cache = model.new_cache(1)
        model(p, cache=cache)
        steps = []
        for t in range(4):
            logits, _ = model(torch.tensor([[t + 7]]), cache=cache)
            steps.append(logits[0, -1])
        alone.append(torch.stack(steps))
    batch = model.new_cache(3)
    for i, p in enumerate(prompts):  # the same prompts' keys and values in one cache
        single = model.new_cache(1)
        model(p, cache=single)
        for dst, src in zip(batch.layers, single.layers, strict=True):
            dst.k[i, :, :p.size(1)] = src.k[0, :, :p.size(1)]
            dst.v[i, :, :p.size(1)] = src.v[0, :, :p.size(1)]
    batch.lengths = torch.tensor([p.size(1) for p in prompts])
    together = []
    for t in range(4):
        logits, _ = model(torch.full((3, 1), t + 7), cache=batch)
        together.append(logits[:, -1])
    assert batch.lengths.tolist() == [7, 13, 9]
    together = torch.stack(together, dim=1)  # (3, steps, V)
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i])


def collect(scheduler, request):
    events = queue.Queue()
    handle = scheduler.submit(request, events.put)
    return handle, events


def drain(events, timeout=30):
    out = []
    while True:
        event = events.get(timeout=timeout)
        out.append(event)
        if isinstance(event, Done | Failed):
            return out


def test_concurrent_greedy_requests_match_the_engine_alone(toy_gpt, byte_tok, one_thread):
    model = toy_gpt(seed=1, max_seq_length=64)
    engine = Engine(model, byte_tok, exact_head=True)
    prompts = ["a", "hello there", "The quick brown fox", "xy"]
    budgets = [20, 7, 90, 30]  # 90 runs past the context of 64: that row slides
    expected = []  # first, so that nothing else computes meanwhile
    for p, m in zip(prompts, budgets, strict=True):
        sample = list(engine.generate(p, SamplingSettings(max_new_tokens=m,
                                                          temperature=0)))[-1].samples[0]
        eot = [byte_tok.eot_id] if sample.finish_reason == "eot" else []
        expected.append((sample.tokens + eot, sample.text))
    scheduler = Scheduler(model, byte_tok, max_batch=3)
    try:
        runs = [collect(scheduler, BatchRequest(byte_tok.encode(p), SamplingSettings(
            max_new_tokens=m, temperature=0))) for p, m in zip(prompts, budgets, strict=True)]
        for (_, events), p, (tokens, text) in zip(runs, prompts, expected, strict=True):
            got = drain(events)
            assert [e.info.token for e in got if isinstance(e, Token)] == tokens
            assert "".join(e.text for e in got if isinstance(e, Token)) == text
            assert got[-1] == Done(len(byte_tok.encode(p)), len(tokens))
        assert scheduler.steps > 0 and scheduler.slides > 0
    finally:
        scheduler.close()


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.9}, {"repetition_penalty": 1.3},
                                   {"top_k": 5, "min_p": 0.05}])
def test_every_sample_of_a_seed_matches_the_engine(toy_gpt, byte_tok, one_thread, extra):
    """``n`` samples with one seed: the server's rows and ``generate --num-samples`` agree
    row by row (row i draws from seed + i in both), with top-p and penalties too."""
    model = toy_gpt(seed=2, max_seq_length=64)
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, num_samples=3, seed=5,
                                **extra)
    result = list(Engine(model, byte_tok).generate("ab", settings))[-1]  # the server's head
    assert len({tuple(s.tokens) for s in result.samples}) > 1  # the rows differ
    scheduler = Scheduler(model, byte_tok, max_batch=3)
    try:
        events = drain(collect(scheduler, BatchRequest(byte_tok.encode("ab"), settings))[1])
    finally:
        scheduler.close()
    for i, sample in enumerate(result.samples):
        tokens = [e.info.token for e in events if isinstance(e, Token) and e.sample == i]
        eot = [byte_tok.eot_id] if sample.finish_reason == "eot" else []
        assert tokens == sample.tokens + eot, i


def test_a_request_ends_at_its_stop_ids(toy_gpt, byte_tok, one_thread):
    """A chat template's end of turn ends a row as end-of-text does, left out of the text."""
    model = toy_gpt(seed=1, max_seq_length=64)
    ids = byte_tok.encode("hello")
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    scheduler = Scheduler(model, byte_tok, max_batch=2)
    try:
        free = [e for e in drain(collect(scheduler, BatchRequest(ids, greedy))[1])
                if isinstance(e, Token)]
        end = free[3].info.token  # the fourth greedy token plays the end of turn
        first = next(i for i, e in enumerate(free) if e.info.token == end)
        got = drain(collect(scheduler, BatchRequest(ids, greedy, stop_ids=(end,)))[1])
    finally:
        scheduler.close()
    tokens = [e for e in got if isinstance(e, Token)]
    assert [e.info.token for e in tokens] == [e.info.token for e in free[:first + 1]]
    assert "".join(e.text for e in tokens) == byte_tok.decode(
        [e.info.token for e in free[:first]])
    assert got[-1] == Done(len(ids), first + 1)


def test_logit_bias_bans_and_forces_tokens_in_its_row_only(toy_gpt, byte_tok, one_thread):
    """OpenAI's logit_bias: -100 keeps a token out (greedy picks the next best), +100 makes
    it all but certain even when sampling; the other rows of the batch are unaffected."""
    model = toy_gpt(seed=1, max_seq_length=64)
    ids = byte_tok.encode("hello")
    greedy = SamplingSettings(max_new_tokens=10, temperature=0)
    sampled = SamplingSettings(max_new_tokens=10, temperature=1.0, seed=3)

    def tokens(events):
        return [e.info.token for e in drain(events) if isinstance(e, Token)]

    scheduler = Scheduler(model, byte_tok, max_batch=4)
    try:
        free = tokens(collect(scheduler, BatchRequest(ids, greedy))[1])
        free_sampled = tokens(collect(scheduler, BatchRequest(ids, sampled))[1])
        banned = free[0]
        forced = next(t for t in range(ord("a"), ord("z")) if t not in free[:1])
        runs = [collect(scheduler, BatchRequest(ids, greedy, logit_bias={banned: -100.0}))[1],
                collect(scheduler, BatchRequest(ids, sampled, logit_bias={forced: 100.0}))[1],
                collect(scheduler, BatchRequest(ids, sampled))[1]]
        got = [tokens(events) for events in runs]
    finally:
        scheduler.close()
    assert banned not in got[0] and got[0][0] != free[0]
    assert got[1] == [forced] * 10
    assert got[2] == free_sampled  # decoded beside the biased rows, as if alone


def test_echo_reports_the_prompts_log_probabilities(toy_gpt, byte_tok, one_thread):
    model = toy_gpt(seed=2)
    ids = byte_tok.encode("some text to score")
    scheduler = Scheduler(model, byte_tok)
    try:
        _, events = collect(scheduler, BatchRequest(ids, SamplingSettings(
            max_new_tokens=0, temperature=0), logprobs=2, echo=True))
        started, done = drain(events)
    finally:
        scheduler.close()
    assert isinstance(started, Started) and done == Done(len(ids), 0)
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor([t.logprob for t in started.prompt[1:]])
    assert started.prompt[0].logprob is None
    torch.testing.assert_close(got, expected)
    assert all(len(t.top) == 2 for t in started.prompt[1:])


def test_a_cancelled_request_frees_its_rows_and_the_queue_is_bounded(toy_gpt, byte_tok):
    model = toy_gpt(seed=0)
    scheduler = Scheduler(model, byte_tok, max_batch=1, max_queue=1, queue_timeout=0.2)
    try:
        long = BatchRequest([1, 2, 3], SamplingSettings(max_new_tokens=10_000,
                                                         temperature=0))
        handle, events = collect(scheduler, long)
        assert isinstance(events.get(timeout=10), Started)
        _, waiting = collect(scheduler, long)  # waits: the only row is busy
        with pytest.raises(QueueFull):
            scheduler.submit(long, lambda e: None)
        failed = drain(waiting)[-1]
        assert isinstance(failed, Failed) and failed.reason == "timeout"
        scheduler.cancel(handle)
        _, after = collect(scheduler, BatchRequest([5], SamplingSettings(max_new_tokens=3)))
        assert isinstance(drain(after)[-1], Done)
    finally:
        scheduler.close()


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-6])
def test_a_vanishing_temperature_decodes_greedily_beside_other_rows(toy_gpt, byte_tok,
                                                                   temperature):
    """A temperature too small to divide by is greedy decoding (as in vLLM), not NaN
    probabilities that break the step for every row."""
    model = toy_gpt(seed=1, max_seq_length=64)
    ids = byte_tok.encode("hello")
    scheduler = Scheduler(model, byte_tok, max_batch=2)
    try:
        greedy = drain(collect(scheduler, BatchRequest(ids, SamplingSettings(
            max_new_tokens=12, temperature=0)))[1])
        other = collect(scheduler, BatchRequest(ids, SamplingSettings(max_new_tokens=40,
                                                                      seed=3)))[1]
        tiny = drain(collect(scheduler, BatchRequest(ids, SamplingSettings(
            max_new_tokens=12, temperature=temperature)))[1])
        assert isinstance(drain(other)[-1], Done)
    finally:
        scheduler.close()
    assert isinstance(tiny[-1], Done)
    assert [e.info.token for e in tiny if isinstance(e, Token)] == \
        [e.info.token for e in greedy if isinstance(e, Token)]


def test_a_failed_step_fails_its_requests_and_the_next_ones_decode(toy_gpt, byte_tok,
                                                                   monkeypatch):
    model = toy_gpt(seed=1, max_seq_length=64)
    scheduler = Scheduler(model, byte_tok, max_batch=2)
    features, calls = model.features, []

    def fail_once(idx, cache):
        calls.append(idx.shape)
        if len(calls) == 4:  # the second of two rows' steps: per-row lengths are set
            raise RuntimeError("out of memory")
        return features(idx, cache)

    monkeypatch.setattr(model, "features", fail_once)
    settings = SamplingSettings(max_new_tokens=30, temperature=0)
    try:
        first = collect(scheduler, BatchRequest(byte_tok.encode("hi"), settings))[1]
        second = collect(scheduler, BatchRequest(byte_tok.encode("hello"), settings))[1]
        for events in (first, second):
            failed = drain(events)[-1]
            assert isinstance(failed, Failed) and "out of memory" in failed.message
        after = [drain(collect(scheduler, BatchRequest(byte_tok.encode(p), settings))[1])
                 for p in ("hi", "a longer prompt")]
    finally:
        scheduler.close()
    assert all(isinstance(events[-1], Done) for events in after)

"""The generation engine: prompts, seeding, the repetition window, stopping."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli.generate import engine
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Notice, SampleFinished, TextDelta

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread is fastest


def streamed(events, sample=0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.sample == sample)


def test_a_prompt_longer_than_the_context_is_cropped(toy_model, byte_tok, run_engine):
    events, result = run_engine(toy_model, byte_tok, "x" * 100, max_new_tokens=5, seed=0)
    assert result.prompt_cropped and result.prompt_tokens == 32
    assert any(isinstance(e, Notice) and "100 tokens" in e.message for e in events)
    assert result.warnings


def test_generation_runs_past_the_context(toy_model, byte_tok, run_engine):
    _, result = run_engine(toy_model, byte_tok, "abc", max_new_tokens=100, temperature=0)
    assert len(result.samples[0].tokens) == 100
    assert result.samples[0].finish_reason == "length"


def test_empty_prompt_starts_from_end_of_text(toy_model, byte_tok, run_engine):
    _, result = run_engine(toy_model, byte_tok, "", max_new_tokens=3, seed=0)
    assert result.prompt_tokens == 1 and not result.prompt_cropped


def test_greedy_samples_in_a_batch_are_identical(toy_model, byte_tok, complete):
    one = complete(toy_model, byte_tok, "Hi", SamplingSettings(max_new_tokens=40, temperature=0))
    three = complete(toy_model, byte_tok, "Hi", SamplingSettings(max_new_tokens=40,
                                                                 temperature=0, num_samples=3))
    assert three == one * 3


def test_same_seed_same_text(toy_model, byte_tok, complete):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01,
              repetition_penalty=1.2, num_samples=2)
    a = complete(toy_model, byte_tok, "Once", SamplingSettings(seed=5, **kw))
    b = complete(toy_model, byte_tok, "Once", SamplingSettings(seed=5, **kw))
    c = complete(toy_model, byte_tok, "Once", SamplingSettings(seed=6, **kw))
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the rows of a batch draw differently


def test_unseeded_runs_report_the_seed_they_used(toy_model, byte_tok, run_engine, complete):
    _, result = run_engine(toy_model, byte_tok, "Once", max_new_tokens=20, temperature=1.0)
    again = complete(toy_model, byte_tok, "Once", SamplingSettings(max_new_tokens=20,
                                                                    temperature=1.0,
                                                                    seed=result.seed))
    assert again == [result.samples[0].text]


def test_the_penalty_sees_the_last_64_tokens_of_each_row(toy_model, byte_tok, monkeypatch,
                                                         run_engine):
    seen = []
    real = engine.sample_next

    def spy(logits, settings, generator=None, recent=None):
        seen.append(recent.clone())
        return real(logits, settings, generator, recent)

    monkeypatch.setattr(engine, "sample_next", spy)
    prompt = byte_tok.encode("abc" * 10)  # fits the context of 32
    _, result = run_engine(toy_model, byte_tok, prompt, max_new_tokens=50, seed=0,
                           num_samples=2, repetition_penalty=1.5)
    assert max(len(s.tokens) for s in result.samples) > 64 - len(prompt)  # the window slid
    assert all(len(recent) == 1 for recent in seen)  # one row per call (a seed per row)
    for row, sample in enumerate(result.samples):
        full = prompt + sample.tokens
        for step, recent in enumerate(seen[row::2][:len(sample.tokens) + 1]):  # till it ended
            assert recent[0].tolist() == full[:len(prompt) + step][-64:]


def test_tokens_the_tokenizer_cannot_decode_are_never_sampled(byte_tok, run_engine, toy_gpt):
    big = toy_gpt(vocab_size=320)
    _, result = run_engine(big, byte_tok, "a", max_new_tokens=200, temperature=5.0, seed=0)
    assert max(result.samples[0].tokens) < 256


@pytest.fixture
def scripted_tokens(monkeypatch):
    """Make the engine 'sample' a fixed token sequence, whatever the model says."""

    def script(tokens: list[int]):
        it = iter(tokens)

        def fake_sample_next(logits, settings, generator=None, recent=None):
            return torch.full((logits.size(0),), next(it), dtype=torch.long)

        monkeypatch.setattr(engine, "sample_next", fake_sample_next)

    return script


def test_end_of_text_stops_a_sample(toy_model, byte_tok, scripted_tokens, run_engine):
    scripted_tokens([*byte_tok.encode("Hi 👋"), byte_tok.eot_id, 65, 66])
    events, result = run_engine(toy_model, byte_tok, "x", max_new_tokens=50)
    assert streamed(events) == result.samples[0].text == "Hi 👋"
    assert result.samples[0].finish_reason == "eot"
    assert result.samples[0].tokens == byte_tok.encode("Hi 👋")
    assert result.generated_tokens == 8  # seven bytes and the end-of-text
    assert [e for e in events if isinstance(e, SampleFinished)] == [SampleFinished(0, "eot", 7)]


def test_stop_strings_stop_and_are_left_out(toy_model, byte_tok, scripted_tokens, run_engine):
    scripted_tokens(byte_tok.encode("Hello.\nUser: more text"))
    events, result = run_engine(toy_model, byte_tok, "x", max_new_tokens=50,
                                stop=["\nUser:", "zzz"])
    assert streamed(events) == result.samples[0].text == "Hello."
    assert result.samples[0].finish_reason == "stop"


def test_text_that_only_looks_like_a_stop_string_is_released(toy_model, byte_tok, scripted_tokens,
                                                             run_engine):
    scripted_tokens(byte_tok.encode("a\nUsb"))
    events, result = run_engine(toy_model, byte_tok, "x", max_new_tokens=5, stop=["\nUser:"])
    assert streamed(events) == result.samples[0].text == "a\nUsb"
    assert result.samples[0].finish_reason == "length"


def test_max_new_tokens_caps(toy_model, byte_tok, run_engine):
    _, result = run_engine(toy_model, byte_tok, "x", max_new_tokens=7, seed=1, num_samples=2)
    assert [len(s.tokens) for s in result.samples] == [7, 7]
    assert {s.finish_reason for s in result.samples} == {"length"}


def test_stop_on_real_model_output(toy_model, byte_tok, run_engine, complete):
    greedy = SamplingSettings(max_new_tokens=30, temperature=0)
    text = complete(toy_model, byte_tok, "Hi", greedy)[0]
    stop = text[10:13]
    _, result = run_engine(toy_model, byte_tok, "Hi", max_new_tokens=30, temperature=0, stop=[stop])
    assert result.samples[0].text == text[:text.index(stop)]


def test_more_samples_than_memory_holds_is_refused_before_anything_is_made(
        toy_model, byte_tok, run_engine, monkeypatch):
    from minigpt_cli.errors import MiniGPTError

    monkeypatch.setattr(engine, "available_memory", lambda: 10 << 20)  # 10 MiB free
    with pytest.raises(MiniGPTError, match=r"num_samples of 100,000 would need about") as e:
        run_engine(toy_model, byte_tok, "ab", max_new_tokens=2, num_samples=100_000)
    assert e.value.setting == "num_samples" and "at most" in e.value.hint
    _, result = run_engine(toy_model, byte_tok, "ab", max_new_tokens=2, num_samples=4)
    assert len(result.samples) == 4  # what fits still runs


def test_a_reply_prefix_is_left_out_of_the_text_streamed_and_whole(toy_model, byte_tok):
    from minigpt_cli.generate.engine import Engine

    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    *_, plain = Engine(toy_model, byte_tok).generate("abc", settings)
    text = plain.samples[0].text
    assert len(text) > 1
    events = list(Engine(toy_model, byte_tok).generate("abc", settings, reply_prefix=text[0]))
    assert streamed(events) == events[-1].samples[0].text == text[1:]
    assert events[-1].samples[0].tokens == plain.samples[0].tokens  # the tokens all stay

"""The generation engine: KV cache, filters, seeding, stopping and streamed UTF-8 text."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.cli.options import SETTING_FLAGS
from minigpt_cli.config import ModelConfig
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate import cache, engine, quant
from minigpt_cli.generate.cache import CachedLM
from minigpt_cli.generate.decoding import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_from,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from minigpt_cli.generate.engine import (
    Engine,
    GenerationResult,
    Notice,
    SampleFinished,
    TextDelta,
)
from minigpt_cli.generate.text import StopFilter, TextStream
from minigpt_cli.model.gpt import GPT


def generate(model, tokenizer, prompt, settings):
    """The engine's events for ``prompt``."""
    return Engine(model, tokenizer).generate(prompt, settings)


def complete(model, tokenizer, prompt, settings) -> list[str]:
    """The text of every sample, without streaming."""
    *_, result = generate(model, tokenizer, prompt, settings)
    assert isinstance(result, GenerationResult)
    return [s.text for s in result.samples]


SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
INF = float("inf")
TEXT = "héllo wörld 👋🏽 世界、こんにちは ok\n¡ñ! 🎉 漢字"
# Training text for the tokenizers that learn a vocabulary. It lacks 🏽 and 字, so
# sentencepiece spells those with byte-fallback pieces, one byte each.
TRAINING_TEXT = ("héllo wörld 👋 世界 こんにちは 🎉 ok. The quick brown fox jumps over it.\n"
                 "Hello world, 世界は広い。こんにちは、元気ですか? 🎉🎉 ñandú ¡hola! 漢\n") * 20
TOKENIZERS = ["byte", "char", "tiktoken", "sentencepiece"]


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread is fastest


def toy(vocab_size: int = 257, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, max_seq_length=32, embed_dim=32, num_heads=2,
                      num_layers=2, ff_dim=64, dropout=0.0)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return toy()


@pytest.fixture(scope="module")
def byte_tok():
    return minigpt_tokenizers.create("byte")


@pytest.fixture(scope="module")
def gpt2_tok():
    ranks = SHARED / "tokenizers" / "gpt2.tiktoken"
    if not ranks.is_file():
        pytest.skip(f"{ranks} not found (set MINIGPT_SHARED_DIR)")
    return minigpt_tokenizers.create(f"tiktoken:{ranks}")


@pytest.fixture(scope="module")
def char_tok():
    return minigpt_tokenizers.create("char", lambda: [TRAINING_TEXT + TEXT])


@pytest.fixture(scope="module")
def sp_tok():
    return minigpt_tokenizers.create("sentencepiece:bpe:400", lambda: [TRAINING_TEXT])


@pytest.fixture
def tokenizer(request):
    """The built-in tokenizer named by the test's ``name`` parameter."""
    fixture = {"byte": "byte_tok", "char": "char_tok", "tiktoken": "gpt2_tok",
               "sentencepiece": "sp_tok"}[request.getfixturevalue("name")]
    return request.getfixturevalue(fixture)


def run(model, tok, prompt, **kw) -> tuple[list, GenerationResult]:
    events = list(generate(model, tok, prompt, SamplingSettings(**kw)))
    assert isinstance(events[-1], GenerationResult)
    return events[:-1], events[-1]


def streamed(events, sample=0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.sample == sample)


# ---- the KV cache -------------------------------------------------------------------------------

def next_window(n: int, context: int = 32) -> int:
    """How many of the latest tokens the model sees after one more: all of them up to the
    context, then the window restarts from the latest half (re-prefilled)."""
    return n + 1 if n < context else context // 2


@pytest.mark.parametrize("head", [False, True])
def test_cached_logits_equal_full_forward_at_every_step_across_the_window(model, head):
    torch.manual_seed(1)
    lm = CachedLM(model, batch_size=2,
                  head=quant.DecodingHead(model, quantize=False) if head else None)
    seq = torch.randint(0, 257, (2, 20))  # the whole sequence, kept apart from the cache
    logits, n = lm.prefill(seq), 20
    for step in range(70):  # context 32: the window slides several times
        with torch.inference_mode():
            full = model(seq[:, -n:])[0][:, -1]  # a fresh forward over the latest n tokens
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        new = torch.randint(0, 257, (2, 1))
        seq, n = torch.cat([seq, new], dim=1), next_window(n)
        logits = lm.append(new)
        assert torch.equal(lm.window, seq[:, -n:])
    with torch.inference_mode():
        torch.testing.assert_close(logits, model(seq[:, -n:])[0][:, -1], atol=1e-5, rtol=1e-5)
    assert lm.slides == 4 and seq.size(1) == 90


def test_small_steps_run_on_one_thread_and_restore_the_setting(model, byte_tok, monkeypatch):
    seen = []
    features = model.features

    def spy(idx, cache=None):
        seen.append((idx.numel(), torch.get_num_threads()))
        return features(idx, cache)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(model, "features", spy)
        run(model, byte_tok, "x" * 20, max_new_tokens=3, seed=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), cache.one_thread():
            assert torch.get_num_threads() == 1
            raise KeyError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [(20, 2), (1, 1), (1, 1)]  # the prompt of 20 tokens keeps both threads


def test_one_thread_blocks_in_several_threads_share_one_switch():
    """Decoding in threads (a server): the count from before the first block comes back
    only when the last block ends, whatever the order they end in."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside, release = threading.Barrier(3), threading.Event()
        seen = []

        def decode(wait: float):
            with cache.one_thread():
                inside.wait()
                release.wait(wait)
                seen.append(torch.get_num_threads())

        workers = [threading.Thread(target=decode, args=(w,)) for w in (0.0, 0.05)]
        for w in workers:
            w.start()
        inside.wait()  # both are inside their block now
        release.set()
        for w in workers:
            w.join()
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
        assert cache._threads_users == 0
    finally:
        torch.set_num_threads(threads)


def test_prefill_of_one_row_is_shared_by_the_batch(model):
    prompt = torch.randint(0, 257, (1, 10))
    lm = CachedLM(model, batch_size=3)
    logits = lm.prefill(prompt)
    assert logits.shape == (3, 257)
    step = torch.tensor([[1], [2], [3]])
    logits = lm.append(step)
    with torch.inference_mode():
        full = model(torch.cat([prompt.expand(3, -1), step], dim=1))[0][:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_a_prompt_longer_than_the_context_is_cropped(model, byte_tok):
    events, result = run(model, byte_tok, "x" * 100, max_new_tokens=5, seed=0)
    assert result.prompt_cropped and result.prompt_tokens == 32
    assert any(isinstance(e, Notice) and "100 tokens" in e.message for e in events)
    assert result.warnings


def test_generation_runs_past_the_context(model, byte_tok):
    _, result = run(model, byte_tok, "abc", max_new_tokens=100, temperature=0)
    assert len(result.samples[0].tokens) == 100
    assert result.samples[0].finish_reason == "length"


def test_empty_prompt_starts_from_end_of_text(model, byte_tok):
    _, result = run(model, byte_tok, "", max_new_tokens=3, seed=0)
    assert result.prompt_tokens == 1 and not result.prompt_cropped


# ---- determinism -------------------------------------------------------------------------------

def test_greedy_is_deterministic_and_matches_a_plain_argmax_loop(model, byte_tok):
    prompt = byte_tok.encode("Hello")
    settings = SamplingSettings(max_new_tokens=80, temperature=0)  # past the context of 32
    texts = [complete(model, byte_tok, prompt, settings)[0] for _ in range(2)]
    assert texts[0] == texts[1]
    seq, n = list(prompt), len(prompt)
    with torch.inference_mode():
        for _ in range(80):  # a full forward for every token, over the engine's window
            seq.append(int(model(torch.tensor([seq[-n:]]))[0][0, -1].argmax()))
            n = next_window(n)
    assert seq[-1] != byte_tok.eot_id
    assert texts[0] == byte_tok.decode(seq[len(prompt):])


def test_greedy_samples_in_a_batch_are_identical(model, byte_tok):
    one = complete(model, byte_tok, "Hi", SamplingSettings(max_new_tokens=40, temperature=0))
    three = complete(model, byte_tok, "Hi", SamplingSettings(max_new_tokens=40, temperature=0,
                                                             num_samples=3))
    assert three == one * 3


def test_same_seed_same_text(model, byte_tok):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01,
              repetition_penalty=1.2, num_samples=2)
    a = complete(model, byte_tok, "Once", SamplingSettings(seed=5, **kw))
    b = complete(model, byte_tok, "Once", SamplingSettings(seed=5, **kw))
    c = complete(model, byte_tok, "Once", SamplingSettings(seed=6, **kw))
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the rows of a batch draw differently


def test_unseeded_runs_report_the_seed_they_used(model, byte_tok):
    _, result = run(model, byte_tok, "Once", max_new_tokens=20, temperature=1.0)
    again = complete(model, byte_tok, "Once", SamplingSettings(max_new_tokens=20,
                                                                temperature=1.0,
                                                                seed=result.seed))
    assert again == [result.samples[0].text]


# ---- filters against hand-computed distributions ---------------------------------------------

def logits_of(*probs) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def probs_after(logits: torch.Tensor) -> list[float]:
    return [round(p, 4) for p in logits.softmax(-1).tolist()]


def test_temperature():
    out = apply_temperature(torch.tensor([1.0, 2.0, 4.0]), 2.0)
    assert out.tolist() == [0.5, 1.0, 2.0]


def test_top_k():
    out = top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
    assert out.tolist() == [-INF, 3.0, 2.0, -INF]
    assert top_k_filter(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("p, expected", [
    (0.1, [1, 0, 0, 0]),
    (0.5, [1, 0, 0, 0]),  # the top token alone reaches 0.5
    (0.7, [0.625, 0.375, 0, 0]),
    (0.85, [0.5263, 0.3158, 0.1579, 0]),
    (1.0, [0.5, 0.3, 0.15, 0.05]),
])
def test_top_p(p, expected):
    logits = logits_of(0.3, 0.05, 0.5, 0.15)
    order = [2, 0, 3, 1]  # the same tokens sorted by probability
    assert [probs_after(top_p_filter(logits, p))[i] for i in order] == expected


def test_top_p_shortcut_agrees_with_a_full_sort():
    torch.manual_seed(0)
    for scale in (0.5, 3.0, 8.0):  # flat to peaked: both the shortcut and the fallback
        logits = torch.randn(3, 5000) * scale
        for p in (0.3, 0.9, 0.99):
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            outside = probs.cumsum(-1) - probs >= p
            outside[:, 0] = False
            expected = logits.masked_fill(outside.scatter(-1, order, outside), -INF)
            torch.testing.assert_close(top_p_filter(logits, p), expected)


def test_min_p():
    logits = logits_of(0.5, 0.3, 0.15, 0.05)
    assert probs_after(min_p_filter(logits, 0.2)) == [0.5263, 0.3158, 0.1579, 0]
    assert probs_after(min_p_filter(logits, 1.0)) == [1, 0, 0, 0]
    assert probs_after(min_p_filter(logits, 0.0)) == [0.5, 0.3, 0.15, 0.05]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5]]  # pure: the input is untouched


def test_sample_from_follows_the_distribution_and_never_picks_zero_mass():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(40_000, -1)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01, rtol=0)


def test_sample_next_combines_the_filters():
    logits = logits_of(0.1, 0.2, 0.3, 0.4).expand(40_000, -1)
    settings = SamplingSettings(temperature=1.0, top_k=2)
    draws = sample_next(logits, settings, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.01, rtol=0)
    greedy = sample_next(logits[:1], SamplingSettings(temperature=0))
    assert greedy.tolist() == [3]
    penalised = sample_next(logits[:1], SamplingSettings(temperature=0, repetition_penalty=3.0),
                            recent=torch.tensor([[3]]))
    assert penalised.tolist() == [2]  # log 0.4 * 3 < log 0.3


def test_the_penalty_sees_the_last_64_tokens_of_each_row(model, byte_tok, monkeypatch):
    seen = []
    real = engine.sample_next

    def spy(logits, settings, generator=None, recent=None):
        seen.append(recent.clone())
        return real(logits, settings, generator, recent)

    monkeypatch.setattr(engine, "sample_next", spy)
    prompt = byte_tok.encode("abc" * 10)  # fits the context of 32
    _, result = run(model, byte_tok, prompt, max_new_tokens=50, seed=0, num_samples=2,
                    repetition_penalty=1.5)
    assert max(len(s.tokens) for s in result.samples) > 64 - len(prompt)  # the window slid
    for row, sample in enumerate(result.samples):
        full = prompt + sample.tokens
        for step, recent in enumerate(seen[:len(sample.tokens) + 1]):  # till it ended
            assert recent[row].tolist() == full[:len(prompt) + step][-64:]


def test_tokens_the_tokenizer_cannot_decode_are_never_sampled(byte_tok):
    big = toy(vocab_size=320)
    _, result = run(big, byte_tok, "a", max_new_tokens=200, temperature=5.0, seed=0)
    assert max(result.samples[0].tokens) < 256


@pytest.mark.parametrize("field, value, flag", [
    ("temperature", -0.1, "--temperature"), ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"), ("top_k", -1, "--top-k"), ("min_p", 1.5, "--min-p"),
    ("min_p", -0.1, "--min-p"), ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("max_new_tokens", 0, "--max-new-tokens"), ("num_samples", 0, "--num-samples"),
    ("temperature", float("nan"), "--temperature"), ("seed", -1, "--seed"),
    ("seed", 2**64, "--seed"),
])
def test_invalid_settings_name_the_setting_and_the_cli_names_its_flag(field, value, flag):
    with pytest.raises(MiniGPTError, match=f"^{field} ") as e:
        SamplingSettings(**{field: value}).validate()
    assert e.value.setting == field and "\n" not in e.value.message
    assert e.value.renamed(SETTING_FLAGS).startswith(f"{flag} ")
    assert "--" not in e.value.message


# ---- stopping --------------------------------------------------------------------------------

@pytest.fixture
def scripted(monkeypatch):
    """Make the engine 'sample' a fixed token sequence, whatever the model says."""

    def script(tokens: list[int]):
        it = iter(tokens)

        def fake_sample_next(logits, settings, generator=None, recent=None):
            return torch.full((logits.size(0),), next(it), dtype=torch.long)

        monkeypatch.setattr(engine, "sample_next", fake_sample_next)

    return script


def test_end_of_text_stops_a_sample(model, byte_tok, scripted):
    scripted([*byte_tok.encode("Hi 👋"), byte_tok.eot_id, 65, 66])
    events, result = run(model, byte_tok, "x", max_new_tokens=50)
    assert streamed(events) == result.samples[0].text == "Hi 👋"
    assert result.samples[0].finish_reason == "eot"
    assert result.samples[0].tokens == byte_tok.encode("Hi 👋")
    assert result.generated_tokens == 8  # seven bytes and the end-of-text
    assert [e for e in events if isinstance(e, SampleFinished)] == [SampleFinished(0, "eot", 7)]


def test_stop_strings_stop_and_are_left_out(model, byte_tok, scripted):
    scripted(byte_tok.encode("Hello.\nUser: more text"))
    events, result = run(model, byte_tok, "x", max_new_tokens=50, stop=["\nUser:", "zzz"])
    assert streamed(events) == result.samples[0].text == "Hello."
    assert result.samples[0].finish_reason == "stop"


def test_text_that_only_looks_like_a_stop_string_is_released(model, byte_tok, scripted):
    scripted(byte_tok.encode("a\nUsb"))
    events, result = run(model, byte_tok, "x", max_new_tokens=5, stop=["\nUser:"])
    assert streamed(events) == result.samples[0].text == "a\nUsb"
    assert result.samples[0].finish_reason == "length"


def test_max_new_tokens_caps(model, byte_tok):
    _, result = run(model, byte_tok, "x", max_new_tokens=7, seed=1, num_samples=2)
    assert [len(s.tokens) for s in result.samples] == [7, 7]
    assert {s.finish_reason for s in result.samples} == {"length"}


def test_stop_on_real_model_output(model, byte_tok):
    text = complete(model, byte_tok, "Hi", SamplingSettings(max_new_tokens=30, temperature=0))[0]
    stop = text[10:13]
    _, result = run(model, byte_tok, "Hi", max_new_tokens=30, temperature=0, stop=[stop])
    assert result.samples[0].text == text[:text.index(stop)]


def test_stop_filter_holds_back_a_possible_start():
    f = StopFilter(["END", "\n\n"])
    assert f.push("abc E") == ("abc ", False)
    assert f.push("N") == ("", False)
    assert f.push("x\n") == ("ENx", False)
    assert f.push("\nrest") == ("", True)
    g = StopFilter(["ab", "b"])
    assert g.push("xab") == ("x", True)  # the earliest stop string wins


# ---- streamed text ---------------------------------------------------------------------------

class DecodeOnly:
    """A tokenizer without decode_bytes: the stream falls back to decoding again."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids)


def stream_pieces(tok, ids) -> list[str]:
    stream = TextStream(tok)
    return [stream.push(i) for i in ids] + [stream.flush()]


def split_points(tok, ids) -> list[int]:
    """Where the tokens cut a character in two: the decode of the first n ends in U+FFFD."""
    return [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_never_splits_characters(name, tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    for t in (tokenizer, DecodeOnly(tokenizer)):
        pieces = stream_pieces(t, ids)
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in p for p in pieces)  # no character was ever split
    if name != "char":  # the test means something: some characters do span tokens
        assert split_points(tokenizer, ids)


def test_stream_waits_for_the_last_byte(byte_tok):
    assert stream_pieces(byte_tok, byte_tok.encode("👋")) == ["", "", "", "👋", ""]


def test_sentencepiece_spells_unseen_characters_with_byte_pieces(sp_tok):
    ids = sp_tok.encode("🏽字")
    assert len(ids) == 7 and all(sp_tok.sp.is_byte(i) for i in ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_equals_decode_for_arbitrary_tokens(name, tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        ids = [i for i in ids if i != tokenizer.eot_id]  # it ends a sample, never streamed
        for t in (tokenizer, DecodeOnly(tokenizer)):
            assert "".join(stream_pieces(t, ids)) == tokenizer.decode(ids), ids


def test_invalid_bytes_become_replacement_characters(byte_tok):
    assert stream_pieces(byte_tok, [0xFF, 0x41]) == ["\ufffd", "A", ""]
    assert "".join(stream_pieces(byte_tok, [0x41, 0xF0, 0x9F])) == "A\ufffd"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_engine_streams_text_as_soon_as_it_is_whole(name, tokenizer, monkeypatch):
    """Through the engine, token by token: before each new token is sampled, the text
    streamed so far is exactly the decode of the tokens so far, less a character still
    missing bytes; never a U+FFFD; in the end, the decode of the whole sequence."""
    ids = tokenizer.encode(TEXT)
    script = iter([*ids, tokenizer.eot_id])
    shown: list[str] = []
    sampled = 0

    def fake_sample_next(logits, settings, generator=None, recent=None):
        nonlocal sampled
        assert "".join(shown) == tokenizer.decode(ids[:sampled]).rstrip("\ufffd"), sampled
        sampled += 1
        return torch.full((logits.size(0),), next(script), dtype=torch.long)

    monkeypatch.setattr(engine, "sample_next", fake_sample_next)
    settings = SamplingSettings(max_new_tokens=len(ids) + 5)
    for event in generate(toy(vocab_size=tokenizer.vocab_size), tokenizer, "o", settings):
        if isinstance(event, TextDelta):
            assert "\ufffd" not in event.text
            shown.append(event.text)
        elif isinstance(event, GenerationResult):
            result = event
    assert sampled == len(ids) + 1 and result.samples[0].finish_reason == "eot"
    assert "".join(shown) == result.samples[0].text == tokenizer.decode(ids) == TEXT
    assert result.samples[0].tokens == ids


class DummyPrefix:
    """Decodes like SentencePiece with a dummy prefix: the text's leading space is dropped."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids).removeprefix(" ")

    def decode_bytes(self, ids):
        return self.tok.decode_bytes(ids)


def test_stream_follows_a_decoder_that_treats_the_first_token_specially(byte_tok):
    tok = DummyPrefix(byte_tok)
    ids = byte_tok.encode(" a b 世")
    assert "".join(stream_pieces(tok, ids)) == tok.decode(ids) == "a b 世"


def test_int8_decoding_head_is_close_to_the_exact_head(model):
    head = quant.DecodingHead(model, quantize=True)
    exact = quant.DecodingHead(model, quantize=False)
    assert exact.mode == "fp32"
    x = torch.randn(3, model.config.embed_dim)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, model.lm_head.weight)
        torch.testing.assert_close(exact(x), ref, atol=1e-5, rtol=1e-5)
        got = head(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if head.mode == "int8":  # the kernel exists on this build
        scale = ref.abs().max()
        assert (got - ref).abs().max() < 0.02 * scale

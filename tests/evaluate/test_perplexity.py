"""Evaluation against models whose probabilities are known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from minigpt_cli.device import Precision
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.evaluate import perplexity as evaluation
from minigpt_cli.evaluate.perplexity import EvalResult, evaluate
from minigpt_cli.evaluate.perplexity import scoring_windows as windows

FP32 = Precision("fp32", None)


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/V. Records what it was asked to score."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.scored: list[int] = []  # target ids that counted
        self.history: list[int] = []  # tokens of context each counted target had
        self.shapes: list[tuple[int, int]] = []

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        self.shapes.append((B, T))
        logits = torch.zeros(B, T, self.vocab_size)
        mask = targets != -1
        self.scored += targets[mask].tolist()
        self.history += (torch.arange(T).expand(B, T)[mask] + 1).tolist()
        loss = F.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, loss


def run(model, tokens, seq_len, batch_size=3, stride=None, **kw) -> EvalResult:
    return evaluate(model, tokens, seq_len, batch_size, "cpu", FP32, stride=stride, **kw)


def test_uniform_model_perplexity_is_vocab_size_and_bits_per_byte_log2_v():
    V, n = 50, 1000
    tokens = np.random.default_rng(0).integers(0, V, n).astype(np.uint16)
    res = run(Uniform(V), tokens, seq_len=16, num_bytes=1234, num_words=200)
    assert res.tokens == n - 1
    assert res.loss == pytest.approx(math.log(V))
    assert res.perplexity == pytest.approx(V)
    assert res.bits_per_byte == pytest.approx(math.log2(V) * res.tokens / 1234)
    assert math.log(res.word_perplexity) == pytest.approx(math.log(V) * res.tokens / 200)
    d = res.to_dict()
    assert set(d) == {"loss", "perplexity", "bits_per_byte", "word_perplexity", "tokens",
                      "bytes", "words"}
    json.dumps(d)


@pytest.mark.parametrize("n,seq_len,stride", [
    (1000, 16, None), (1000, 16, 16), (1000, 16, 5), (1000, 16, 1), (17, 16, None),
    (18, 16, 8), (2, 16, None), (5, 16, 3), (40, 8, 7),
])
def test_every_token_but_the_first_is_scored_exactly_once(n, seq_len, stride):
    model = Uniform(n)
    res = run(model, np.arange(n), seq_len, stride=stride)  # token id == position
    assert sorted(model.scored) == list(range(1, n))
    assert res.tokens == n - 1
    assert all(T <= seq_len for _, T in model.shapes)
    if stride is not None:  # after the first window, at least context - stride of history
        late = [h for tok, h in zip(model.scored, model.history, strict=True) if tok > seq_len]
        assert all(h >= seq_len - stride for h in late)


def test_stride_equal_to_context_is_the_non_overlapping_default(toy_gpt):
    model = toy_gpt(vocab_size=40, max_seq_length=12, embed_dim=16, num_layers=1,
                    ff_dim=32).train()
    tokens = torch.randint(0, 40, (101,))
    a = run(model, tokens, 12)
    b = run(model, tokens, 12, stride=12)
    assert a.total_nll == pytest.approx(b.total_nll, rel=1e-6)
    assert a.tokens == b.tokens == 100
    assert list(windows(101, 12)) == list(windows(101, 12, 12))


def test_text_shorter_than_one_window_is_one_partial_window():
    model = Uniform(10)
    res = run(model, np.array([1, 2, 3, 4, 5]), seq_len=32)
    assert res.tokens == 4
    assert model.shapes == [(1, 4)]
    assert res.loss == pytest.approx(math.log(10))


def test_too_short_and_bad_arguments_are_user_errors():
    with pytest.raises(MiniGPTError, match="too short"):
        run(Uniform(10), np.array([3]), seq_len=8)
    with pytest.raises(MiniGPTError, match="stride"):
        run(Uniform(10), np.arange(10), seq_len=8, stride=9)
    with pytest.raises(MiniGPTError, match="stride"):
        run(Uniform(10), np.arange(10), seq_len=8, stride=0)


def test_window_covering_the_text_equals_a_full_sequence_computation(toy_gpt):
    model = toy_gpt()
    tokens = torch.randint(0, 257, (25,))  # shorter than the context of 32
    with torch.no_grad():
        _, ref = model(tokens[None, :-1], tokens[None, 1:], reduction="sum")
    for stride in (None, 3, 32):
        res = run(model, tokens, seq_len=32, stride=stride)
        assert res.tokens == 24
        assert res.total_nll == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("seq_len,stride", [(8, 3), (8, 1), (8, 8), (16, 5)])
def test_sliding_windows_match_hugging_face_reference(seq_len, stride, toy_gpt):
    """The perplexity guide's loop, written independently, on a small real GPT."""
    model = toy_gpt()
    tokens = torch.randint(0, 257, (30,))  # the whole text fits in the model's context
    n, max_length = len(tokens), seq_len + 1  # HF's windows hold the label token too
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            trg_len = end - prev_end
            ids = tokens[begin:end]
            labels = ids.clone()
            labels[:-trg_len] = -100
            logits, _ = model(ids[None, :-1])
            logp = torch.log_softmax(logits[0].double(), -1)
            shifted = labels[1:]  # logits at i predict token i + 1
            keep = shifted != -100
            nll -= float(logp[torch.arange(len(shifted))[keep], shifted[keep]].sum())
            count += int(keep.sum())
            prev_end = end
            if end == n:
                break
    res = run(model, tokens, seq_len=seq_len, stride=stride)
    assert res.tokens == count == n - 1
    assert res.total_nll == pytest.approx(nll, rel=1e-5)


def test_training_mode_is_restored_and_progress_reaches_the_total(toy_gpt):
    model = toy_gpt().train()
    calls = []
    run(model, torch.randint(0, 257, (100,)), seq_len=32, progress=lambda d, t: calls.append(
        (d, t)))
    assert model.training
    assert calls[0] == (0, 99) and calls[-1] == (99, 99)


def test_unknown_text_size_gives_no_byte_or_word_figures():
    res = run(Uniform(4), np.arange(4) % 4, seq_len=8)
    assert res.bits_per_byte is None and res.word_perplexity is None
    assert res.to_dict()["bits_per_byte"] is None


def test_record_keeps_results_keyed(tmp_path):
    evaluation.record(tmp_path, evaluation.result_key("wikitext-2", "test", None), {"loss": 1})
    evaluation.record(tmp_path, evaluation.result_key("wikitext-2", "val", 64), {"loss": 2})
    evaluation.record(tmp_path, evaluation.result_key("wikitext-2", "test", None), {"loss": 3})
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data) == {"wikitext-2:test", "wikitext-2:val@stride=64"}
    assert data["wikitext-2:test"]["loss"] == 3

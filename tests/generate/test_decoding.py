"""Decoding: temperature, the top-k, top-p and min-p filters, the repetition penalty and
sampling, against hand-computed distributions; the settings' validation."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt_cli.cli.options import SETTING_FLAGS
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate.decoding import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_from,
    sample_next,
    sample_rows,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


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


@pytest.mark.parametrize("settings", [
    SamplingSettings(temperature=0.8), SamplingSettings(temperature=1.3, top_k=50),
    SamplingSettings(temperature=0.7, min_p=0.05), SamplingSettings(temperature=0)])
def test_rows_sampled_together_get_the_tokens_each_gets_alone(settings):
    # the server samples the rows of requests decoded together in one batch, each row with
    # its request's generator: a row's tokens must not depend on its neighbours
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1)) * 3
    for step in range(20):
        alone = [int(sample_next(logits[b:b + 1], settings,
                                 torch.Generator().manual_seed(100 * step + b))[0])
                 for b in range(6)]
        gens = [torch.Generator().manual_seed(100 * step + b) for b in range(6)]
        assert sample_rows(logits, settings, gens).tolist() == alone


@pytest.mark.parametrize("field, value, flag", [
    ("temperature", -0.1, "--temperature"), ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"), ("top_k", -1, "--top-k"), ("min_p", 1.5, "--min-p"),
    ("min_p", -0.1, "--min-p"), ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("max_new_tokens", 0, "--max-new-tokens"), ("num_samples", 0, "--num-samples"),
    ("temperature", float("nan"), "--temperature"), ("seed", -1, "--seed"),
    ("temperature", float("inf"), "--temperature"),
    ("repetition_penalty", float("inf"), "--repetition-penalty"),
    ("seed", 2**64, "--seed"),
])
def test_invalid_settings_name_the_setting_and_the_cli_names_its_flag(field, value, flag):
    with pytest.raises(MiniGPTError, match=f"^{field} ") as e:
        SamplingSettings(**{field: value}).validate()
    assert e.value.setting == field and "\n" not in e.value.message
    assert e.value.renamed(SETTING_FLAGS).startswith(f"{flag} ")
    assert "--" not in e.value.message


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy(temperature):
    logits = torch.randn(3, 500) * 20
    settings = SamplingSettings(temperature=temperature)
    assert settings.greedy and not SamplingSettings(temperature=1e-4).greedy
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, settings, gen), logits.argmax(-1))
    assert torch.equal(sample_rows(logits, settings, [gen] * 3), logits.argmax(-1))

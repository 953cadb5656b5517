"""Attention maps: one head or the mean of all, for the tokens of a text."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.evaluate.attention import attention_map


def test_attention_map_heads_mean_and_range(toy_gpt):
    model = toy_gpt(seed=1)
    ids = [5, 9, 200, 3, 3, 17]
    heads = [attention_map(model, ids, 1, h) for h in range(2)]
    torch.testing.assert_close(attention_map(model, ids, 1), (heads[0] + heads[1]) / 2)
    with pytest.raises(MiniGPTError, match="^layer 2 is out of range") as e:
        attention_map(model, ids, 2)
    assert e.value.setting == "layer"
    with pytest.raises(MiniGPTError, match="^head 2 is out of range") as e:
        attention_map(model, ids, 0, 2)
    assert e.value.setting == "head"
    with pytest.raises(MiniGPTError, match="no tokens"):
        attention_map(model, [], 0)

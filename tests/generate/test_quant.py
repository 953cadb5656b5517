"""The decoding head: an exact fp32 copy, and the int8 one where the kernel exists."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli.generate import quant


def test_exact_decoding_head_is_the_models_head(toy_model):
    exact = quant.DecodingHead(toy_model, quantize=False)
    assert exact.mode == "fp32"
    x = torch.randn(3, toy_model.config.embed_dim)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, toy_model.lm_head.weight)
        torch.testing.assert_close(exact(x), ref, atol=1e-5, rtol=1e-5)


def test_int8_decoding_head_is_close_to_the_exact_head(toy_model):
    head = quant.DecodingHead(toy_model, quantize=True)
    if head.mode != "int8":
        pytest.skip(f"no int8 kernel on this build (torch {torch.__version__}): the head "
                    f"falls back to {head.mode}")
    exact = quant.DecodingHead(toy_model, quantize=False)
    assert exact.mode == "fp32"
    x = torch.randn(3, toy_model.config.embed_dim)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, toy_model.lm_head.weight)
        torch.testing.assert_close(exact(x), ref, atol=1e-5, rtol=1e-5)
        got = head(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.02 * scale

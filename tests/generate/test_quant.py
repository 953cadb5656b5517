"""Quantised inference: the int8 and int4 layers, ``quantize_model``, and the decoding head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.generate import quant
from minigpt_cli.generate.decoding import SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")

# Logits of the quantised toy model against fp32, as a fraction of the largest |logit|.
# int8 (per-row scales, bf16 inputs) stays within 2%; int4 (groups of 32) within 15%.
LOGIT_TOLERANCE = {"int8": 0.02, "int4": 0.15}


def quantized(model, mode):
    return quant.quantize_model(copy.deepcopy(model), mode)


@pytest.mark.parametrize("mode", quant.QUANTIZE_MODES)
def test_quantized_logits_are_close_to_fp32(toy_model, mode):
    q = quantized(toy_model, mode)
    idx = torch.randint(0, toy_model.config.vocab_size, (2, 24), generator=torch.Generator()
                        .manual_seed(0))
    with torch.inference_mode():
        ref, _ = toy_model(idx)
        got, _ = q(idx)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < LOGIT_TOLERANCE[mode], f"{mode}: {err:.4f}"
    assert err > 0  # the weights did change


@pytest.mark.parametrize("mode", quant.QUANTIZE_MODES)
def test_every_linear_layer_and_the_head_are_quantized(toy_model, mode):
    q = quantized(toy_model, mode)
    linears = [n for n, m in toy_model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears
    layers = dict(q.named_modules())
    assert all(isinstance(layers[n], quant.QuantizedLinear) for n in linears)
    assert not any(type(m) is nn.Linear for m in q.modules())
    # the tied embedding keeps its exact table; the fp32 original is untouched
    torch.testing.assert_close(q.transformer.wte.weight, toy_model.transformer.wte.weight)
    assert type(toy_model.lm_head) is nn.Linear


@pytest.mark.parametrize("mode, bits", [("int8", 8), ("int4", 4)])
def test_dequantized_weights_round_to_the_nearest_level(mode, bits):
    """Each weight is within half a quantisation step of the original, and the kernel
    computes with exactly the dequantised weights (up to bf16 inputs)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)  # 40 rows: int4 pads them to 48
    layer = quant.Int8Linear(lin) if mode == "int8" else quant.Int4Linear(lin)
    w = lin.weight.detach()
    deq = layer.weight
    if mode == "int8":
        step = w.abs().amax(dim=1, keepdim=True) / 127
    else:
        g = w.reshape(40, -1, quant.INT4_GROUP)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(quant.INT4_GROUP, dim=1)
    assert ((deq - w).abs() <= 0.51 * step * (1 + 2 ** -7) + 1e-6).all()
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = x.bfloat16().float() @ deq.t() + lin.bias
        torch.testing.assert_close(layer(x), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer(x[None])[0], layer(x))  # any leading shape


@pytest.mark.parametrize("width", [40, 100, 8])
def test_int8_layers_of_any_width_give_the_dequantised_products(width):
    """The int8 kernel reads its inputs 16 at a time: other widths are padded, never read
    past their end (which gave wrong sums, or a segfault, for batches of rows)."""
    torch.manual_seed(0)
    lin = nn.Linear(width, 65)
    layer = quant.Int8Linear(lin)
    assert layer.weight.shape == (65, width)
    x = torch.randn(7, width)
    with torch.inference_mode():
        want = x.bfloat16().float() @ layer.weight.t() + lin.bias
        torch.testing.assert_close(layer(x), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer(x[3:4]), layer(x)[3:4])


def test_int8_decoding_head_of_a_width_not_a_multiple_of_16():
    torch.manual_seed(0)
    model = nn.Module()
    model.lm_head = nn.Linear(40, 300, bias=False)
    head = quant.DecodingHead(model, quantize=True, kernels=["int8pack"])
    assert head.mode == "int8" and head.kernel == "int8pack"
    x = torch.randn(5, 40)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, model.lm_head.weight)
        assert (head(x) - ref).abs().max() < 0.02 * ref.abs().max()


def test_any_model_of_linear_layers_is_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ref = model(x)
        for mode in quant.QUANTIZE_MODES:
            got = quantized(model, mode)(x)
            assert (got - ref).abs().max() < LOGIT_TOLERANCE[mode] * ref.abs().max()
    q = quantized(model, "int4")  # 96 inputs: groups of 32 fit, both layers are int4
    assert [m.mode for m in q if isinstance(m, quant.QuantizedLinear)] == ["int4", "int4"]
    q = quant.quantize_model(copy.deepcopy(model), "int4", group=128)  # they do not: int8
    assert [m.mode for m in q if isinstance(m, quant.QuantizedLinear)] == ["int8", "int8"]


def test_int4_says_which_layers_stayed_int8():
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 64))
    assert quant.int4_fallback_note(quantized(model, "int8"), "int8") is None
    note = quant.int4_fallback_note(quantized(model, "int4"), "int4")  # 48 inputs: int8
    assert note == ("int4: 1 of the 2 linear layers stayed int8, as their input width is "
                    "not a multiple of 32")
    q = quant.quantize_model(copy.deepcopy(model), "int4", group=128)
    assert quant.int4_fallback_note(q, "int4", group=128).startswith(
        "int4: every one of the 2 linear layers stayed int8")
    every = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    assert quant.int4_fallback_note(quantized(every, "int4"), "int4") is None


@pytest.mark.parametrize("mode", quant.QUANTIZE_MODES)
@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_model_counts_the_parameters_it_had(toy_model, mode, tied):
    """``chat``'s /show prints ``num_params``: quantised layers hold buffers, not
    parameters, and still count (the tied head once)."""
    model = toy_model
    if not tied:
        model = copy.deepcopy(toy_model)
        model.config.tie_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert quantized(model, mode).num_params() == model.num_params()


def test_no_quantization_leaves_the_model_as_it_is(toy_model):
    before = {k: v.clone() for k, v in toy_model.state_dict().items()}
    for mode in (None, "none"):
        assert quant.quantize_model(toy_model, mode) is toy_model
    assert type(toy_model.lm_head) is nn.Linear
    for k, v in toy_model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("mode", ["int3", "fp8", "INT8"])
def test_an_unknown_mode_names_the_setting(toy_model, mode):
    with pytest.raises(MiniGPTError) as e:
        quant.quantize_model(toy_model, mode)
    assert e.value.setting == "quantize" and mode in e.value.message


def test_the_engine_decodes_with_the_quantized_head(toy_model, byte_tok, run_engine):
    q = quantized(toy_model, "int8")
    head = quant.DecodingHead(q)
    assert head.mode == "int8" and head.exact and head.layer is q.lm_head
    for temperature in (0.0, 0.8):  # greedy too: the quantised model is the model now
        settings = SamplingSettings(max_new_tokens=40, temperature=temperature, seed=1)
        _, result = run_engine(q, byte_tok, "Hello", settings)
        assert len(result.samples[0].tokens) + (result.samples[0].finish_reason == "eot") == 40
    # its greedy continuation is the one its own full forward gives
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0)
    _, result = run_engine(q, byte_tok, "Hello", settings)
    idx = torch.tensor([byte_tok.encode("Hello")])
    with torch.inference_mode():
        for _ in range(8):
            idx = torch.cat([idx, q(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert result.samples[0].tokens == idx[0, 5:].tolist()


def test_exact_decoding_head_is_the_models_head(toy_model):
    exact = quant.DecodingHead(toy_model, quantize=False)
    assert exact.mode == "fp32"
    x = torch.randn(3, toy_model.config.embed_dim)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, toy_model.lm_head.weight)
        torch.testing.assert_close(exact(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["int8xint8-prepacked", "int8xint8", "int8pack"])
def test_int8_decoding_head_is_close_to_the_exact_head(toy_model, kernel):
    head = quant.DecodingHead(toy_model, quantize=True, kernels=[kernel])
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
    assert head.kernel == kernel
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.02 * scale


def test_prepacked_int8_products_are_bit_for_bit_those_of_int_mm(toy_model):
    head = quant.DecodingHead(toy_model, quantize=True, kernels=["int8xint8-prepacked"])
    if head.mode != "int8":
        pytest.skip("no prepacked int8 x int8 kernel on this CPU or build")
    plain = quant.DecodingHead(toy_model, quantize=True, kernels=["int8xint8"])
    assert plain.kernel == "int8xint8" and not hasattr(head, "q")  # one int8 copy each
    torch.manual_seed(2)
    C = toy_model.config.embed_dim
    for rows in (1, 2, 5, 8, 17):
        x = torch.randn(rows, C) * torch.logspace(-3, 3, rows)[:, None]
        x[0] = 1.0  # 255 in every unsigned byte
        with torch.inference_mode():
            assert torch.equal(head(x), plain(x)), rows


def test_an_int8_kernel_that_fails_here_is_not_chosen(toy_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setattr(torch, "_int_mm", broken)
    head = quant.DecodingHead(toy_model, quantize=True, kernels=["int8xint8"])
    assert head.mode == "fp32" and head.exact and not hasattr(head, "q")
    # nothing to try (a build without int8 kernels): the exact fp32 head too
    assert quant.DecodingHead(toy_model, quantize=True, kernels=[]).mode == "fp32"
    x = torch.randn(2, toy_model.config.embed_dim)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), torch.nn.functional.linear(
            x, toy_model.lm_head.weight), atol=1e-5, rtol=1e-5)


def test_int8_by_int8_keeps_about_15_bits_of_the_activations():
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    scales = w.abs().amax(dim=1) / 127
    q = torch.round(w / scales[:, None]).to(torch.int8)
    x = torch.randn(5, 64) * torch.tensor([[0.01], [1.0], [30.0], [1.0], [1e4]])
    got = quant.int8_by_int8(x, q, scales)
    ref = x @ (q.float() * scales[:, None]).t()  # the same int8 weights, exact activations
    assert got.dtype == torch.float32 and got.shape == (5, 300)
    # the error of each row is its own, relative to that row's size
    err = ((got - ref).abs().amax(-1) / ref.abs().amax(-1))
    assert (err < 1e-3).all(), err


def test_int8_by_int8_gives_a_row_the_same_result_alone_or_in_a_batch():
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (200, 48), dtype=torch.int8)
    scales = torch.rand(200) / 100
    x = torch.randn(7, 48)
    batch = quant.int8_by_int8(x, q, scales)
    for i in range(7):
        assert torch.equal(quant.int8_by_int8(x[i:i + 1], q, scales), batch[i:i + 1])
    assert torch.equal(quant.int8_by_int8(x[2:5], q, scales), batch[2:5])


@pytest.mark.parametrize("isa, expected", [(None, True), ("ALL", True), ("AVX2", False),
                                           ("avx512_core", False),
                                           ("AVX512_CORE_VNNI", True), ("AVX512_CORE_AMX", True)])
def test_the_int8_by_int8_head_needs_dot_products_that_onednn_may_use(isa, expected,
                                                                        monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    if isa is None:
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", isa)
    assert quant.int8_dot_products() is expected
    assert ("int8xint8" in quant.int8_kernels()) is expected
    assert quant.int8_kernels()[-1] == "int8pack"


def test_no_int8_dot_products_without_vnni_or_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert not quant.int8_dot_products()
    assert quant.int8_kernels() == ["int8pack"]

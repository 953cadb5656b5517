"""FLOPs per token and device peaks (the measured CPU figure itself is printed by
benchmarks/matmul_peak.py, not asserted here)."""

import math

import torch

from minigpt_cli.device import Precision
from minigpt_cli.model import flops
from minigpt_cli.model.gpt import GPT

BF16, FP32 = Precision("bf16", torch.bfloat16), Precision("fp32", None)


def test_flops_per_token_counts_every_weight_once_and_the_attention(toy_config):
    cfg = toy_config(vocab_size=50257, max_seq_length=128, embed_dim=256, num_heads=8,
                     num_layers=4, ff_dim=1024)  # the small preset's shape
    model = GPT(cfg)
    C, L, F, V = 256, 4, 1024, 50257
    per_layer = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    weights = V * C + L * per_layer + 2 * C  # tied head once, final norm, no positions
    assert flops.flops_per_token(model) == 6 * weights + 12 * L * 128 * C



def test_flops_per_token_of_a_llama_style_model(toy_config):
    """No position table; grouped-query attention's smaller kv projections; an untied
    head counted, its input embedding (a lookup) not."""
    cfg = toy_config(vocab_size=1000, max_seq_length=64, embed_dim=64, num_heads=4,
                     num_layers=2, ff_dim=96, bias=False, position="rope", norm="rmsnorm",
                     mlp="swiglu", num_kv_heads=2, tie_embeddings=False)
    C, L, F, V, KV = 64, 2, 96, 1000, 2 * 16
    per_layer = 2 * C + (C * (C + 2 * KV)) + C * C + 3 * C * F
    weights = V * C + L * per_layer + C  # the head, the blocks, the final norm
    assert flops.flops_per_token(GPT(cfg)) == 6 * weights + 12 * L * 64 * C


def test_gpu_peaks_come_from_the_data_sheet(monkeypatch):
    cuda = torch.device("cuda")
    for name, precision, expected in [("NVIDIA H100 80GB HBM3", BF16, 989e12),
                                      ("NVIDIA H100 PCIe", BF16, 756e12),
                                      ("NVIDIA A100-SXM4-40GB", FP32, 156e12),
                                      ("Tesla T4", FP32, None),
                                      ("Some Future GPU", BF16, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, n=name: n)
        assert flops.peak_flops(cuda, precision) == expected, name
    assert flops.peak_flops(torch.device("mps"), BF16) is None


def test_cpu_peak_is_measured():
    peak = flops.measure_matmul_flops(torch.device("cpu"), torch.float32, (64, 64, 64), 2)
    assert isinstance(peak, float) and math.isfinite(peak) and peak > 0  # its size: a benchmark
    assert flops.peak_flops(torch.device("cpu"), FP32) > 0

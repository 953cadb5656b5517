"""Model FLOPs utilisation: the arithmetic a model needs per token, and what a device can do.

MFU = tokens/s x FLOPs per token / peak FLOP/s. GPUs are rated against their data-sheet
dense tensor-core peak; a CPU has no such figure, so its peak is measured here with a
matmul in the training dtype.
"""

from __future__ import annotations

import time

import torch

from minigpt_cli.device import Precision
from minigpt_cli.model.gpt import GPT

# Dense (no sparsity) tensor-core peaks in TFLOP/s: (bf16/fp16, tf32). Names are matched
# as substrings of torch.cuda.get_device_name(), most specific first.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.5),
    ("H200", 989.0, 494.5),
    ("GH200", 989.0, 494.5),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("V100", 125.0, 0.0),  # fp16 only; no TF32
    ("T4", 65.0, 0.0),
]


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward; the tied head counted
    once, the position embeddings and an untied token embedding, which are lookups, not
    at all) plus the attention scores (PaLM's estimate, as nanoGPT uses; with fewer kv
    heads the scores cost the same)."""
    cfg = model.config
    lookups = [model.transformer.wpe] if "wpe" in model.transformer else []
    if not model.tied:
        lookups.append(model.transformer.wte)
    weights = model.num_params() - sum(m.weight.numel() for m in lookups)
    return transformer_flops_per_token(weights, cfg.num_layers, cfg.max_seq_length,
                                       cfg.embed_dim)


def transformer_flops_per_token(weights: int, layers: int, context: int, width: int) -> float:
    """6 FLOPs per weight per token, plus 12 x layers x context x width for attention."""
    return 6.0 * weights + 12.0 * layers * context * width


def measure_matmul_flops(device: torch.device, dtype: torch.dtype,
                         shape: tuple[int, int, int] = (2048, 1024, 1024),
                         repeats: int = 10) -> float:
    """FLOP/s of an (M x K) @ (K x N) matmul on ``device``: the best of ``repeats`` runs."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 2):  # two warm-up runs
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def peak_flops(device: torch.device, precision: Precision) -> float | None:
    """The peak FLOP/s that MFU is measured against, or None where it is not known."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, tf32 in GPU_PEAKS:
            if key in name:
                tflops = tf32 if precision.dtype is None else half
                return tflops * 1e12 if tflops else None
        return None
    if device.type == "cpu":
        return measure_matmul_flops(device, precision.dtype or torch.float32)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

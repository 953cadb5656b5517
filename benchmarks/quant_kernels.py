"""Quantised linear layers on the CPU: minigpt's against torchao's and fp32, per call.

One ``nn.Linear`` of each shape the `small` model decodes with (batch 1), timed four or
five ways in turn: fp32 ``nn.Linear``; ``Int8Linear`` and ``Int4Linear`` (minigpt_cli/
generate/quant.py); torchao's ``Int8WeightOnlyConfig`` and, where it takes the shape, its
CPU int4 layout (``PrototypeInt4WeightOnlyConfig``, bf16 weights, groups of 32). Each figure
is the median of ``--calls`` timed calls, in microseconds (robust to the time slices that
other processes take on a loaded machine).

Then the decoding head (``DecodingHead``: the head's int8 copy, on all threads, as decoding
runs it) at batch 1, 4, 8 and 16, with each int8 kernel this machine has: the weight-only
``int8pack`` (bf16 activations) and, on CPUs with VNNI or AMX, ``int8xint8`` (activations
split into two int8 parts) through ``torch._int_mm`` and through weights prepacked by oneDNN
(``int8xint8-prepacked``, the same sums); beside them the exact fp32 copy, and each kernel's largest
error as a fraction of the largest exact logit.

Usage: python benchmarks/quant_kernels.py [--threads 1] [--calls 300] [--head-threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import machine  # benchmarks/machine.py, beside this script
import torch
import torch.nn as nn

from minigpt_cli.generate.quant import (
    INT4_GROUP,
    DecodingHead,
    Int4Linear,
    Int8Linear,
    int8_kernels,
)

SHAPES = [(768, 256, "attn.c_attn"), (256, 256, "attn.c_proj"), (1024, 256, "mlp.c_fc"),
          (256, 1024, "mlp.c_proj"), (50257, 256, "lm_head")]


def torchao_layers(lin: nn.Linear) -> dict:
    """torchao's quantised copies of ``lin`` that it can make, or why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        return {"torchao": f"not installed ({e})"}
    out = {}
    m8 = copy.deepcopy(lin)
    quantize_(m8, Int8WeightOnlyConfig())
    out["torchao int8"] = m8
    try:
        m4 = copy.deepcopy(lin).bfloat16()
        quantize_(m4, PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP))
        out["torchao int4"] = lambda x, m=m4: m(x.bfloat16()).float()
    except Exception as e:  # e.g. rows not a multiple of 16
        out["torchao int4"] = f"fails: {str(e).splitlines()[0][:60]}"
    return out


def median_us(fn, x, calls: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class _Model(nn.Module):
    """Just a head, as ``DecodingHead`` takes it from a model."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.lm_head = head


def head_kernels(threads: int, calls: int) -> None:
    torch.set_num_threads(threads)
    model = _Model(nn.Linear(256, 50257, bias=False))
    exact = DecodingHead(model, quantize=False)
    heads = {}
    for kernel in int8_kernels():
        head = DecodingHead(model, quantize=True, kernels=[kernel])
        if head.mode == "int8":
            heads[kernel] = head
    print(f"the decoding head 50257x256, {threads} threads, microseconds per call (median) "
          "and largest error / largest logit:")
    for batch in (1, 4, 8, 16):
        x = torch.randn(batch, 256)
        with torch.inference_mode():
            ref = exact(x)
            cells = [f"fp32 {median_us(exact, x, calls):6.0f}"]
            for kernel, head in heads.items():
                err = float((head(x) - ref).abs().max() / ref.abs().max())
                cells.append(f"int8 {kernel} {median_us(head, x, calls):6.0f} ({err:.2%})")
        print(f"batch {batch:2d}: " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (decoding steps "
                    "through the layers run on one)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--head-threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for the decoding head (default: all, as it runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {machine.cpu()}; {machine.torch_level()}; load {machine.load()}")
    print("microseconds per call, batch 1 (median):")
    for n, k, name in SHAPES:
        lin = nn.Linear(k, n, bias=name != "lm_head")
        ways = {"fp32": lin, "minigpt int8": Int8Linear(lin), "minigpt int4": Int4Linear(lin),
                **torchao_layers(lin)}
        x = torch.randn(1, k)
        cells = []
        for way, fn in ways.items():
            cells.append(f"{way} {fn}" if isinstance(fn, str) else
                         f"{way} {median_us(fn, x, args.calls):7.0f}")
        print(f"{name:12s} {n:5d}x{k:<4d} " + " | ".join(cells))
    head_kernels(args.head_threads, args.calls)
    print(f"load after: {machine.load()}")


if __name__ == "__main__":
    main()

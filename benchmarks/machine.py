"""What the benchmarks print about the machine: the CPU, its vector flags, torch's kernel
level and the load, so that every figure says where it came from."""

from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
AVX2_ONLY_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu() -> str:
    """'AMD EPYC (2 CPUs; avx2 avx512f avx512_bf16)', plus torch's level when imported."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = " ".join(f for f in FLAGS if f in flags) or "flags unknown"
    text = f"{name} ({os.cpu_count()} CPUs; {have})"
    forced = {k: os.environ[k] for k in AVX2_ONLY_ENV if k in os.environ}
    if forced:
        text += " run as " + " ".join(f"{k}={v}" for k, v in forced.items())
    return text


def torch_level() -> str:
    import torch

    return f"torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}, " \
           f"{torch.get_num_threads()} threads"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"

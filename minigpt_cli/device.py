"""Device and precision selection: CUDA, Apple MPS or CPU; bf16/fp16 autocast."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
from dataclasses import dataclass

import torch

from minigpt_cli.errors import DeviceError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. Asking for a missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} was asked for but no CUDA GPU is available",
                              "use cpu or auto", setting="device")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise DeviceError(f"device {name} is unknown", "use cuda or cuda:N",
                              setting="device") from e
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"no GPU {dev.index}: {torch.cuda.device_count()} visible")
        return dev
    if name == "mps":
        if not _mps_available():
            raise DeviceError("device mps was asked for but Apple MPS is not available",
                              "use cpu or auto", setting="device")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"device {name} is unknown", "use auto, cpu, cuda, cuda:N or mps",
                      setting="device")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass(frozen=True)
class Precision:
    """How a device computes: ``dtype`` is the autocast dtype, None for plain fp32."""

    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16).

    Without either, bf16 is emulated and slower than fp32, so ``auto`` keeps fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def select_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that have it, else fp16 with loss scaling; bf16 on CPUs with
    native bf16 matmuls (AMX, AVX512-BF16); fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_fast_bf16():
            requested = "bf16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return Precision("fp32", None)
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("precision bf16 is not supported by this GPU", "use fp16",
                              setting="precision")
        return Precision("bf16", torch.bfloat16)
    if requested == "fp16":
        if device.type == "cpu":
            raise DeviceError("precision fp16 is not supported on the CPU", "use bf16 or fp32",
                              setting="precision")
        return Precision("fp16", torch.float16)
    raise DeviceError(f"precision {requested} is unknown", "use auto, fp32, bf16 or fp16",
                      setting="precision")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: a GPU's out-of-memory error, the CPU
    allocator's (a RuntimeError) or NumPy's (MemoryError)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text
                                            or "out of memory" in text)


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def configure_backends(device: torch.device) -> None:
    """Fast paths that do not change results meaningfully: TF32 matmuls on Ampere+; on the
    CPU, freed memory kept for reuse (see ``keep_freed_memory``)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_freed_memory()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process instead of returning it.

    By default every tensor over a few MB gets fresh pages from the kernel and gives them
    back when freed, so each training step pays a page fault per 4 KB of its largest
    tensors: for the `small` preset on two cores that is about 40% of the step. This is
    the jemalloc/TCMalloc advice of PyTorch's CPU tuning guides, done with the C library
    already loaded. The process's memory then stays at its peak. Returns whether it applied
    (glibc only: a no-op on macOS, Windows and musl).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_MMAP_MAX, 0),  # large blocks from the heap too, so they are reused
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap
                mallopt(_M_TOP_PAD, 256 << 20)])  # and grow it in large steps


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type

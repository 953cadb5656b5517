"""Quantised inference on the CPU: weight-only int8 and int4 linear layers, and the
decoding head.

``quantize_model(model, "int8" | "int4")`` swaps every ``nn.Linear`` of a model, the
output head included, for a quantised copy; everything else (embeddings, norms, the KV
cache) stays fp32. It is the one entry point that commands and the server call.

- int8: one scale per output row (as llama.cpp's q8), through ``torch._weight_int8pack_mm``.
- int4: asymmetric, one scale and zero per group of ``INT4_GROUP`` inputs (as llama.cpp's
  q4_1), through ``torch._weight_int4pack_mm_for_cpu``; a layer whose width is not a
  multiple of the group stays int8.

Both kernels take bf16 activations (their fp32 variants are 5-15x slower on AVX2 and
AVX-512 alike), so the inputs of a quantised layer are rounded to bf16; the products are
summed in fp32 and returned rounded to bf16 (8 significant bits), as fp32. Scales are
chosen as bf16 values first and the weights quantised against them, so the kernels see
exactly the weights that ``dequantize`` gives.

The decoding head (``DecodingHead``) keeps an int8 copy of the head even without
``quantize_model``; on CPUs with int8 dot products (VNNI, AMX) it multiplies int8 by int8
instead, with each activation split into two int8 parts.

torchao (0.18) was measured first: its ``Int8WeightOnlyConfig`` converts the int8 weight
to fp32 on every call on the CPU (3-9x slower than these layers, slower than fp32 itself),
and its CPU int4 layout (``PrototypeInt4WeightOnlyConfig``) runs the same kernel as here
about 2x slower per call and cannot take the 50,257-row head (rows must be a multiple of
16). See README's speed section for the figures.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.nn import functional as F

from minigpt_cli.errors import MiniGPTError

QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP = 32  # inputs per int4 scale and zero; the kernel takes 32, 64, 128 or 256
_INT4_ROWS = 16  # the int4 kernel wants a multiple of 16 output rows: pad with zeros
# torch._weight_int8pack_mm reads 16 inputs at a time with aligned loads (8 on AVX2) and no
# tail: a width that is not a multiple of 16 gives wrong sums or a segfault. Pad with zeros.
_INT8_WIDTH = 16


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with quantised weights: ``forward`` runs the int kernel, ``weight``
    gives the dequantised (V, C) weight for code that reads it (e.g. a chunked head loss).
    """

    mode = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) bf16 -> (M, N') products, N' >= N."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous())
        y = y[:, :self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.mode}"


class Int8Linear(QuantizedLinear):
    """Weight-only int8, symmetric, one bf16 scale per output row."""

    mode = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", pad_width(q))  # (N, K'), K' >= K
        self.register_buffer("scales", scales)  # (N,)

    def dequantize(self) -> torch.Tensor:
        return self.qweight[:, :self.in_features].float() * self.scales.float()[:, None]

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8pack_mm(x, self.qweight, self.scales)


def pad_width(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, K) with zero columns added up to a width the int8 kernel takes."""
    pad = -t.size(1) % _INT8_WIDTH
    return (F.pad(t, (0, pad)) if pad else t).contiguous()


def int8pack_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) times the int8 weights ``q`` (N, K') of ``pad_width``, one bf16 scale
    per row: (M, N) in bf16, by ``torch._weight_int8pack_mm``."""
    return torch._weight_int8pack_mm(pad_width(x.to(torch.bfloat16)), q, scales)


class Int4Linear(QuantizedLinear):
    """Weight-only int4, asymmetric, one bf16 scale and zero per group of inputs.

    The kernel computes ``(q - 8) * scale + zero`` for ``q`` in 0..15; here ``zero`` is
    the group's minimum plus eight steps, so the range [min, max] maps onto 0..15.
    """

    mode = "int4"

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear)
        assert linear.in_features % group == 0, "width must be a multiple of the group"
        self.group = group
        w = linear.weight.detach().float()
        N, K = w.shape
        rows = -(-N // _INT4_ROWS) * _INT4_ROWS
        w = torch.cat([w, w.new_zeros(rows - N, K)]) if rows > N else w
        g = w.reshape(rows, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        q = torch.round((g - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.to(torch.int32).reshape(rows, K)
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K / group, N', 2): scale and zero of each group, as the kernel reads them
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        # the codes once more, unpacked, for dequantize (a quarter of fp32's memory)
        self.register_buffer("codes", q[:N].to(torch.uint8), persistent=False)

    def dequantize(self) -> torch.Tensor:
        N = self.out_features
        sz = self.scales_and_zeros[:, :N].float().transpose(0, 1)  # (N, K / group, 2)
        q = self.codes.float().reshape(N, -1, self.group)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(N, self.in_features)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group,
                                                 self.scales_and_zeros)


def check_quantize(mode: str | None, device: torch.device | str = "cpu") -> str | None:
    """``mode`` if quantised inference can run it on ``device``; None for no quantisation."""
    if mode in (None, "", "none", "fp32"):
        return None
    if mode not in QUANTIZE_MODES:
        raise MiniGPTError(f"quantize must be none, int8 or int4, got {mode!r}",
                           setting="quantize")
    if torch.device(device).type != "cpu":
        raise MiniGPTError(f"quantize {mode} runs on the CPU only, not on {device}",
                           "run it on the CPU, or leave quantisation out on a GPU",
                           setting="quantize")
    return mode


def quantize_model(model: nn.Module, mode: str | None, group: int = INT4_GROUP) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (on the CPU) by its ``mode`` copy, in place.

    ``mode``: "int8", "int4" or None/"none" (nothing changes). Tied weights stay with the
    modules that are not linear layers (the token embedding keeps its fp32 table). Raises
    ``MiniGPTError`` (setting ``quantize``) for an unknown mode, a model off the CPU, or a
    PyTorch build without the kernel.
    """
    device = next(model.parameters()).device
    mode = check_quantize(mode, device)
    if mode is None:
        return model
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    with torch.inference_mode(False), torch.no_grad():
        for parent, name, child in targets:
            try:
                if mode == "int4" and child.in_features % group == 0:
                    layer = Int4Linear(child, group)
                else:
                    layer = Int8Linear(child)
                layer(torch.zeros(1, child.in_features))  # the kernels are build-dependent
            except (RuntimeError, AttributeError) as e:
                raise MiniGPTError(f"quantize {mode} needs a PyTorch build with its CPU "
                                   f"kernel ({e})", setting="quantize") from e
            setattr(parent, name, layer)
    return model


def int4_fallback_note(model: nn.Module, mode: str | None, group: int = INT4_GROUP) -> str | None:
    """For ``int4``: which quantised layers are int8 instead (their width is not a multiple
    of the group), to be said; None when every layer is int4, or for another mode."""
    if mode != "int4":
        return None
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    int8 = sum(isinstance(m, Int8Linear) for m in layers)
    if not int8:
        return None
    which = "every one of the" if int8 == len(layers) else f"{int8} of the"
    return (f"int4: {which} {len(layers)} linear layers stayed int8, as their input width "
            f"is not a multiple of {group}")


class DecodingHead:
    """The output head for the one position per row that decoding needs.

    On the CPU, the head (V x C, the largest matrix by far) is read once per token, so
    its layout and size decide the speed. ``quantize`` keeps an int8 copy with one scale
    per vocabulary row (weight-only quantisation, as llama.cpp's q8): a quarter of the
    memory traffic, logits within about 1% of the exact ones. Where the CPU multiplies
    int8 by int8 in hardware (VNNI, AMX), the activations go in as two int8 parts each
    (``int8_by_int8``: about 15 bits kept, exact int32 sums), 1.05-1.6x faster than the
    weight-only kernel and closer to the exact logits, with the weights prepacked by
    oneDNN where this PyTorch can (``PrepackedInt8``); elsewhere that kernel
    (``_weight_int8pack_mm``, bf16 activations) runs. Without ``quantize`` (or where no
    int8 kernel works), an exact fp32 copy in (C, V) layout is used, about twice as fast as
    the model's own (V, C) one. A model whose head ``quantize_model`` replaced keeps that
    head. Elsewhere the model's own weights are used as they are. ``kernels`` names the
    int8 kernels to try, in order (default: ``int8_kernels()``, this machine's).
    """

    def __init__(self, model: nn.Module, quantize: bool = True,
                 kernels: list[str] | None = None):
        if isinstance(model.lm_head, QuantizedLinear):
            self.layer = model.lm_head
            self.mode = model.lm_head.mode
            return
        w = model.lm_head.weight
        self.weight = w
        self.mode = "model"
        if w.device.type != "cpu":
            return
        with torch.inference_mode():
            w = w.detach().float()
            if quantize:
                scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
                self.q = torch.round(w / scales[:, None]).to(torch.int8).contiguous()
                for kernel in int8_kernels() if kernels is None else kernels:
                    self.kernel = kernel
                    self.scales = scales if kernel != "int8pack" else scales.to(torch.bfloat16)
                    if kernel == "int8pack":
                        self.q = pad_width(self.q)
                    self.mode = "int8"
                    try:  # the kernels are CPU- and build-dependent: check once
                        self._check_kernel(w.size(1))
                        return
                    except (RuntimeError, AttributeError):
                        self.mode = "model"
                for name in ("q", "scales", "kernel"):  # no int8 kernel runs here
                    self.__dict__.pop(name, None)
            self.t = w.t().contiguous()
            self.mode = "fp32"

    def _check_kernel(self, width: int) -> None:
        """Raise if ``self.kernel`` does not run here, or (prepacked) gives other sums than
        ``torch._int_mm``: an activation of all ones puts 255 in every unsigned byte, which
        a kernel that sums pairs of products in 16 bits (AVX2 without VNNI) would clip."""
        if self.kernel != "int8xint8-prepacked":
            self(torch.zeros(1, width))
            return
        packed, probe = PrepackedInt8(self.q), torch.ones(1, width)
        if not torch.equal(int8_by_int8(probe, None, self.scales, packed),
                           int8_by_int8(probe, self.q, self.scales)):
            raise RuntimeError("the prepacked int8 products differ from torch._int_mm's")
        self.packed = packed
        del self.q  # the prepacked copy is all it needs

    @property
    def exact(self) -> bool:
        """Whether the logits are the model's own (its weights, quantised or not)."""
        return self.mode != "int8" or hasattr(self, "layer")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) hidden states -> (B, V) fp32 logits."""
        if hasattr(self, "layer"):
            return self.layer(x)
        if self.mode == "int8":
            if self.kernel == "int8xint8-prepacked":
                return int8_by_int8(x, None, self.scales, self.packed)
            if self.kernel == "int8xint8":
                return int8_by_int8(x, self.q, self.scales)
            return int8pack_mm(x, self.q, self.scales).float()
        if self.mode == "fp32":
            return x @ self.t
        return F.linear(x, self.weight)


_LO = 254  # the second int8 part of an activation counts in steps of 1/254 of the first's


def int8_dot_products() -> bool:
    """Whether this CPU multiplies int8 by int8 in hardware (VNNI or AMX), which makes
    ``torch._int_mm`` several times faster than the weight-only kernel. oneDNN runs it, so
    a ``DNNL_MAX_CPU_ISA`` that caps oneDNN below VNNI (e.g. ``AVX2``) counts as no."""
    cpu = torch.cpu
    if not (getattr(cpu, "_is_vnni_supported", lambda: False)()
            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()):
        return False
    cap = os.environ.get("DNNL_MAX_CPU_ISA", "ALL").upper()
    return cap == "ALL" or any(k in cap for k in ("VNNI", "BF16", "FP16", "AMX", "AVX10"))


def int8_kernels() -> list[str]:
    """The decoding head's int8 kernels to try on this machine, fastest first."""
    kernels = []
    if hasattr(torch, "_int_mm") and int8_dot_products():
        kernels += ["int8xint8-prepacked", "int8xint8"]
    if hasattr(torch, "_weight_int8pack_mm"):
        kernels.append("int8pack")
    return kernels


class PrepackedInt8:
    """int8 weights (N, K) laid out once by oneDNN for int8 x int8 products, which then
    skip the reordering of the weights that ``torch._int_mm`` does on every call: 1.5x
    faster for 2 to 16 rows of activations (about the same for one row), for the same exact
    sums. The activations go in as unsigned bytes with a zero point of 128; with unit
    scales the kernel's fp32 results are the int32 sums themselves (exact below 2**24)."""

    def __init__(self, q: torch.Tensor):
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)
        self.ones = torch.ones(q.size(0))
        self.zeros = torch.zeros(q.size(0), dtype=torch.long)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` (M, K) of integers within [-127, 127], as floats -> (M, N) fp32 sums."""
        u = a.add(128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(u, 1.0, 128, self.weight, self.ones,
                                                  self.zeros, None, 1.0, 0, torch.float32,
                                                  "none", [], "")


def int8_by_int8(x: torch.Tensor, q: torch.Tensor | None, scales: torch.Tensor,
                 packed: PrepackedInt8 | None = None) -> torch.Tensor:
    """``x`` (M, K) times the int8 weights ``q`` (N, K) with one fp32 scale per row of
    ``q``: (M, N) fp32, in int8 x int8 products with exact int32 sums, by ``torch._int_mm``
    or, given ``packed`` (``q`` prepacked), by oneDNN, bit for bit the same.

    Each row of ``x`` is split into two int8 parts, ``x ~ s * (hi + lo / 254)`` with one
    ``s`` per row, so the products keep about 15 bits of ``x`` (bf16, which the weight-only
    kernel takes, keeps 8), and a row's result never depends on the other rows.
    """
    s = x.float().abs().amax(-1, keepdim=True).clamp_(min=1e-30).div_(127)
    xs = x / s  # within [-127, 127]
    hi = xs.round()
    lo = xs.sub_(hi).mul_(_LO).round_()  # the remainder, within [-127, 127]
    if packed is not None:
        acc = packed(torch.cat([hi, lo]))
        return acc[:x.size(0)].add_(acc[x.size(0):], alpha=1 / _LO).mul_(s).mul_(scales)
    qt = q.t()
    if x.size(0) == 1:  # one vector: the kernel's matrix-vector path twice beats one 2-row product
        out = torch._int_mm(hi.to(torch.int8), qt).float()
        out.add_(torch._int_mm(lo.to(torch.int8), qt), alpha=1 / _LO)
    else:
        acc = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), qt)
        out = acc[:x.size(0)].float().add_(acc[x.size(0):], alpha=1 / _LO)
    return out.mul_(s).mul_(scales)

"""The model's fast paths, beside it rather than in it: ``gpt.py`` calls these functions,
and each one says what plain PyTorch it stands for.

- ``dropout``: ``F.dropout`` with the CPU's mask drawn 16 bits at a time.
- ``attention``: ``F.scaled_dot_product_attention``, written out where CPU training is
  faster that way.
- ``head_cross_entropy``: ``F.cross_entropy(h @ w.T, targets)`` without the full logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``, with the CPU's mask drawn from 64-bit random words, 16 bits per element.

    On the CPU, ``F.dropout`` draws one Bernoulli sample per element, which costs about as
    much as the matmuls of a small model. Four elements per 64-bit draw is 8x faster. The
    drop probability is ``p`` rounded to a multiple of 1/65536, and the kept values are
    scaled by exactly the inverse of the keep probability. Elsewhere: ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    cut = round(p * 65536)
    if cut == 0:  # p under 1/131072: nothing is dropped
        return x * 1.0
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-2**63, None)  # all 64 bits (a bare random_() leaves the sign bit 0)
    bits = words.view(torch.int16)[:x.numel()].view(x.shape)
    # keep where bits >= low: 1 or 0 as int16, by clamping and shifting (a bool mask
    # costs 6x as much: its conversion to bf16 is not vectorised)
    low = cut - 32768
    keep = bits.clamp(low - 1, low).sub_(low - 1)
    return x * keep.to(x.dtype).mul_(65536 / (65536 - cut))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through the fast CPU ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of (B, H, T, D) queries and (B, H, S, D) keys and
    values: causal, or with a boolean ``mask`` (T, S) of the keys each query may see.

    CPU training with dropout or in bf16 takes :func:`math_attention` instead: with dropout
    SDPA would take that path too (with a slower mask), and in bf16 the fused CPU kernel's
    backward is 3-4x slower than it at these sizes.
    """
    if training and q.device.type == "cpu" and (dropout_p > 0.0 or q.dtype != torch.float32):
        return math_attention(q, k, v, mask, causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          dropout_p=dropout_p if training else 0.0,
                                          is_causal=causal and mask is None)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, causal: bool, dropout_p: float = 0.0
                   ) -> torch.Tensor:
    """SDPA's math path written out, with the fast CPU ``dropout`` on the weights.

    As in SDPA, the mask becomes an additive bias (0 or -inf), and one ``baddbmm`` scales
    the scores and adds it: on the CPU a broadcast ``masked_fill`` (and its backward) took
    4-5x as long as the matmul itself.
    """
    B, H, T, D = q.shape
    S = k.size(-2)
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is None:
        bias, beta = q.new_zeros(()), 0.0
    else:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias, beta = bias.masked_fill_(~mask, float("-inf")), 1.0
    att = torch.baddbmm(bias.expand(B, H, T, S).reshape(B * H, T, S), q.reshape(B * H, T, D),
                        k.reshape(B * H, S, D).transpose(1, 2), beta=beta,
                        alpha=1.0 / math.sqrt(D))
    return dropout(torch.softmax(att.view(B, H, T, S), dim=-1), dropout_p) @ v


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T`` against ``targets``, chunk by chunk.

    The full fp32 logits never exist. A chunk of rows gets its logits in the matmul dtype,
    a tile of rows at a time (by default the whole chunk), and the softmax runs over them
    a few rows (a block) at a time, in the CPU's cache, and overwrites the logits with the
    gradient, softmax minus one-hot. Two matmuls per chunk then give the gradients for ``h`` and
    ``w``: they are computed here, in the forward pass, and handed out in ``backward``.
    """

    @staticmethod
    def forward(ctx, h, w, targets, dtype, chunk, tile, block, need_grad, need_grad_w):
        w_c = w.to(dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_wt = None  # (C, V), or a view of a (V, C) tensor
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        logits = torch.empty(min(chunk, h.size(0)), w.size(0), dtype=dtype, device=h.device)
        tiny = torch.finfo(torch.float32).tiny
        for i in range(0, h.size(0), chunk):
            h_c = h[i:i + chunk].to(dtype)
            n = h_c.size(0)
            g = logits[:n]
            weight = (targets[i:i + n] != -1).unsqueeze(1).to(torch.float32)
            # on a GPU, multiplying costs less than the host sync of asking
            ignored = h.device.type != "cpu" or bool((weight == 0).any())
            safe_t = targets[i:i + n].clamp(min=0).unsqueeze(1)
            for j in range(0, n, tile):
                torch.mm(h_c[j:j + tile], w_c.t(), out=g[j:j + tile])
                for k in range(j, min(j + tile, n), block):
                    rows = slice(k, min(k + block, j + tile))
                    probs = torch.softmax(g[rows].float(), dim=-1)
                    p_target = probs.gather(1, safe_t[rows]).clamp(min=tiny)
                    total -= (p_target.log() * weight[rows]).sum()
                    if need_grad:
                        probs.scatter_add_(1, safe_t[rows], -weight[rows])  # softmax - one-hot
                        if ignored:  # ignored rows: no gradient
                            probs.mul_(weight[rows])
                        g[rows].copy_(probs)
            if need_grad:
                grad_h[i:i + n] = (g @ w_c).to(h.dtype)
                if need_grad_w:  # not for a frozen head (LoRA): the largest matmul saved
                    if h.device.type == "cpu" and dtype == torch.float32:
                        # fp32 (MKL): g.T @ h_c, in w's own layout (a (C, V) view of it),
                        # ran 1.4x faster than h_c.T @ g on a Zen 4 and needs no transpose
                        part = (g.t() @ h_c).t()
                    else:  # bf16 (oneDNN): the other way round is 1.5x faster
                        h_t = h_c.t()
                        if h.device.type == "cpu" and g.size(1) >= 32 * h_t.size(0):
                            h_t = h_t.contiguous()  # 1.1x faster for 50257 x 256 than the view
                        part = h_t @ g
                    grad_wt = part if grad_wt is None else grad_wt.float().add_(part)
        ctx.save_for_backward(grad_h, grad_wt)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_wt = ctx.saved_tensors
        grad_w = None
        if grad_wt is not None:
            # (V, C) in w's own layout: a transposed gradient makes every later add slow
            if grad_wt.t().is_contiguous() and grad_wt.dtype == ctx.w_dtype:
                grad_w = grad_wt.t() * grad_out  # already in that layout (fp32 on the CPU)
            else:
                grad_w = torch.empty(grad_wt.shape[::-1], dtype=ctx.w_dtype,
                                     device=grad_wt.device)
                grad_w.copy_(grad_wt.t()).mul_(grad_out)
        return grad_h * grad_out, grad_w, None, None, None, None, None, None, None


def head_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                       reduction: str = "mean", chunk: int | None = None,
                       tile: int | None = None, block: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(h @ w.T, targets, ignore_index=-1)`` without the full fp32 logits.

    Under autocast the matmuls run in the autocast dtype; the softmax is always fp32.
    Sizes in rows: ``chunk`` rows share the gradient matmuls (by default up to 128M
    logits on the CPU, all rows of a typical batch; 32M on a GPU, where the whole chunk's
    fp32 softmax exists at once). The logits are made ``tile`` rows at a time, by default
    the whole chunk in one matmul: the matmul of a 50,257 x 256 head runs faster on more
    rows (on a Zen 5, bf16: 640 GFLOP/s for 166 rows, 860 for 512), which outweighs the
    logits' falling out of the cache (on a Zen 4, a step of ``small`` took 5.7% less time
    in fp32 and 1.5% less in bf16 than with tiles of 32M logits). On the CPU the softmax
    takes ``block`` rows at a time (about 1M logits, for L2); on a GPU the whole tile.
    """
    V = w.size(0)
    on_cpu = h.device.type == "cpu"
    chunk = chunk or max(256, (1 << (27 if on_cpu else 25)) // V)
    tile = tile or chunk
    block = block or (max(1, (1 << 20) // V) if on_cpu else tile)
    dtype = (torch.get_autocast_dtype(h.device.type)
             if torch.is_autocast_enabled(h.device.type) else h.dtype)
    # not ctx.needs_input_grad, which is true under no_grad too: validation would pay for
    # the two gradient matmuls
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        total = _ChunkedHeadLoss.apply(h, w, targets, dtype, chunk, tile, block, need_grad,
                                       need_grad and w.requires_grad)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != -1).sum().clamp(min=1)
    raise ValueError(f"unsupported reduction {reduction!r}")

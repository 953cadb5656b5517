"""The modern building blocks ``gpt.py`` can compose instead of GPT-2's: RMSNorm, rotary
positions and the SwiGLU MLP. Each is what Llama computes (and what transformers'
``LlamaRMSNorm``, ``apply_rotary_pos_emb`` and ``LlamaMLP`` compute), so the weights map
one to one onto a Hugging Face Llama.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from minigpt_cli.model.kernels import Dropout


class RMSNorm(nn.Module):
    """Scale by the root mean square, then by a learned gain; computed in float32 and
    returned in the input's dtype, as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), rotate-half layout: feature i of a head pairs
    with feature i + D/2 and turns by ``position * theta^(-2i/D)``.

    The angles for every position of the context are computed once (a buffer, not a
    weight: checkpoints never hold it)."""

    def __init__(self, head_dim: int, context: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)
                                    / head_dim))
        angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (T_max, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate (B, H, T, D) queries and keys whose first position is ``start`` (or
        ``start[b]`` in row b)."""
        T = q.size(-2)
        if isinstance(start, torch.Tensor):  # rows at their own positions: (B, 1, T, D)
            pos = start[:, None] + torch.arange(T, device=start.device)
            cos, sin = self.cos[pos][:, None].to(q.dtype), self.sin[pos][:, None].to(q.dtype)
        else:
            cos = self.cos[start:start + T].to(q.dtype)
            sin = self.sin[start:start + T].to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class NoRotation(nn.Module):
    """Learned positions are added to the embedding; attention leaves q and k alone."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class SwiGLU(nn.Module):
    """The gated MLP of Llama: ``c_proj(silu(c_gate(x)) * c_fc(x))``."""

    def __init__(self, embed_dim: int, ff_dim: int, bias: bool, dropout: float):
        super().__init__()
        self.c_gate = nn.Linear(embed_dim, ff_dim, bias=bias)
        self.c_fc = nn.Linear(embed_dim, ff_dim, bias=bias)
        self.c_proj = nn.Linear(ff_dim, embed_dim, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        return self.dropout(y) if self.training else y

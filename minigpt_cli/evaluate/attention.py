"""Attention weights of a trained GPT, for ``minigpt inspect attention``.

The model computes attention with ``F.scaled_dot_product_attention``, which never
materialises the weights. Here the blocks below the requested layer run as usual, and
that layer's weights are recomputed from its ``c_attn`` projection:
``softmax(q @ k.T / sqrt(D) + causal mask)``. Multiplying them by the layer's values gives
back exactly what the fused kernel computed. No printing here.
"""

from __future__ import annotations

import math

import torch

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.model import GPT


def check_layer_head(model: GPT, layer: int, head: int | None) -> None:
    cfg = model.config
    if not 0 <= layer < cfg.num_layers:
        raise MiniGPTError(f"--layer {layer} is out of range: the model has {cfg.num_layers} "
                           f"layers", f"pass 0 to {cfg.num_layers - 1}")
    if head is not None and not 0 <= head < cfg.num_heads:
        raise MiniGPTError(f"--head {head} is out of range: each layer has {cfg.num_heads} "
                           f"heads", f"pass 0 to {cfg.num_heads - 1}, or leave it out for "
                                     f"the mean over heads")


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """Every head's attention weights in ``layer`` for ``idx`` (B, T): (B, H, T, T).

    Row ``i`` of a head's map holds how much query token ``i`` attends to each key token
    ``j <= i``; every row sums to one and the upper triangle is zero.
    """
    check_layer_head(model, layer, None)
    B, T = idx.shape
    assert T <= model.config.max_seq_length, f"{T} tokens exceed the model's context"
    tr = model.transformer
    pos = torch.arange(T, dtype=torch.long, device=idx.device)
    x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
    for block in tr.h[:layer]:
        x = block(x)
    block = tr.h[layer]
    C, H = x.size(-1), model.config.num_heads
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
    q = q.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def attention_map(model: GPT, ids: list[int], layer: int, head: int | None = None
                  ) -> torch.Tensor:
    """The (T, T) weights of one ``head`` of ``layer`` for ``ids``, or their mean over heads."""
    check_layer_head(model, layer, head)
    if not ids:
        raise MiniGPTError("the text has no tokens", "pass some text")
    device = model.transformer.wte.weight.device
    weights = attention_weights(model, torch.tensor([ids], device=device), layer)[0]
    return (weights.mean(dim=0) if head is None else weights[head]).cpu()


def scale_max(weights: torch.Tensor) -> float:
    """The top of a colour scale for a (T, T) map: its largest weight below the first row.

    The first token can attend only to itself, so its weight is always 1; scaling to the
    rest keeps diffuse maps (a mean over heads, a long text) from looking empty.
    """
    return float(weights[1:].max()) if weights.size(0) > 1 else 1.0

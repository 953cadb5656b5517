"""Attention weights of a trained GPT, for ``minigpt inspect attention``.

The weights come from the model itself (``GPT.attention_weights``): its own embedding,
blocks and query/key projections, so they stay right whatever the positions or the
attention variant. No printing here.
"""

from __future__ import annotations

import torch

from minigpt_cli.errors import MiniGPTError
from minigpt_cli.model.gpt import GPT


def check_layer_head(model: GPT, layer: int, head: int | None) -> None:
    cfg = model.config
    if not 0 <= layer < cfg.num_layers:
        raise MiniGPTError(f"layer {layer} is out of range: the model has {cfg.num_layers} "
                           f"layers", f"pass 0 to {cfg.num_layers - 1}", setting="layer")
    if head is not None and not 0 <= head < cfg.num_heads:
        raise MiniGPTError(f"head {head} is out of range: each layer has {cfg.num_heads} "
                           f"heads", f"pass 0 to {cfg.num_heads - 1}, or leave it out for "
                                     f"the mean over heads", setting="head")


def attention_map(model: GPT, ids: list[int], layer: int, head: int | None = None
                  ) -> torch.Tensor:
    """The (T, T) weights of one ``head`` of ``layer`` for ``ids``, or their mean over heads.

    Row ``i`` holds how much query token ``i`` attends to each key token ``j <= i``; every
    row sums to one and the upper triangle is zero.
    """
    check_layer_head(model, layer, head)
    if not ids:
        raise MiniGPTError("the text has no tokens", "pass some text")
    if len(ids) > model.config.max_seq_length:
        raise MiniGPTError(f"the text has {len(ids)} tokens, more than the model's context "
                           f"({model.config.max_seq_length})", "pass a shorter text")
    device = model.transformer.wte.weight.device
    weights = model.attention_weights(torch.tensor([ids], device=device), layer)[0]
    return (weights.mean(dim=0) if head is None else weights[head]).cpu()


def scale_max(weights: torch.Tensor) -> float:
    """The top of a colour scale for a (T, T) map: its largest weight below the first row.

    The first token can attend only to itself, so its weight is always 1; scaling to the
    rest keeps diffuse maps (a mean over heads, a long text) from looking empty.
    """
    return float(weights[1:].max()) if weights.size(0) > 1 else 1.0

"""The GPT: pre-LN transformer blocks, learned positions, tied embeddings.

Written bottom-up in nanoGPT's spirit, with GPT-2's parameter names so weights map one to
one onto GPT-2 checkpoints. Shapes use B (batch), T (time), C (embed_dim), H (heads),
D (head_dim), V (vocab). No I/O and no printing here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from minigpt_cli.config import ModelConfig


@dataclass
class LayerCache:
    """Keys and values of one attention layer for incremental decoding."""

    k: torch.Tensor  # (B, H, T_max, D)
    v: torch.Tensor  # (B, H, T_max, D)


class KVCache:
    """Pre-allocated keys/values for every layer; ``length`` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype):
        shape = (batch_size, cfg.num_heads, cfg.max_seq_length, cfg.head_dim)
        self.layers = [
            LayerCache(torch.empty(shape, device=device, dtype=dtype),
                       torch.empty(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)
        ]
        self.length = 0
        self.capacity = cfg.max_seq_length

    def reset(self) -> None:
        self.length = 0


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
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-2**63, None)  # all 64 bits (a bare random_() leaves the sign bit 0)
    bits = words.view(torch.int16)[:x.numel()].view(x.shape)
    mask = (bits >= cut - 32768).to(x.dtype).mul_(65536 / (65536 - cut))
    return x * mask


class Dropout(nn.Dropout):
    """``nn.Dropout`` through the fast CPU ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q = q.view(B, T, self.num_heads, -1).transpose(1, 2)
        k = k.view(B, T, self.num_heads, -1).transpose(1, 2)
        v = v.view(B, T, self.num_heads, -1).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            cache.k[:B, :, start:start + T] = k
            cache.v[:B, :, start:start + T] = v
            k, v = cache.k[:B, :, :start + T], cache.v[:B, :, :start + T]
            if start > 0:
                causal = False
                if T > 1:  # new queries see all cached keys plus their own past
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        if self.training and x.device.type == "cpu" and (
                self.dropout > 0.0 or q.dtype != torch.float32):
            y = self._explicit_attention(q, k, v, mask, causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=causal and mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


    def _explicit_attention(self, q, k, v, mask, causal):
        """SDPA's math path, written out: what CPU training uses with dropout (SDPA would
        take this path too, with a slower mask) or in bf16 (where the fused CPU kernel's
        backward is 3-4x slower than this at these sizes)."""
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        if mask is None and causal:
            mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = dropout(torch.softmax(att, dim=-1), self.dropout)
        return att @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.embed_dim, cfg.ff_dim, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(cfg.ff_dim, cfg.embed_dim, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T`` against ``targets``, chunk by chunk.

    The full fp32 logits never exist. A chunk of rows gets its logits in the matmul dtype,
    a tile of rows at a time, and while a tile is still in the CPU's cache the softmax runs
    over it a few rows (a block) at a time and overwrites the logits with the gradient,
    softmax minus one-hot. Two matmuls per chunk then give the gradients for ``h`` and
    ``w``: they are computed here, in the forward pass, and handed out in ``backward``.
    """

    @staticmethod
    def forward(ctx, h, w, targets, dtype, chunk, tile, block, need_grad):
        w_c = w.to(dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_wt = None  # (C, V): h_c.T @ g is much faster than g.T @ h_c
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        logits = torch.empty(min(chunk, h.size(0)), w.size(0), dtype=dtype, device=h.device)
        tiny = torch.finfo(torch.float32).tiny
        for i in range(0, h.size(0), chunk):
            h_c = h[i:i + chunk].to(dtype)
            n = h_c.size(0)
            g = logits[:n]
            weight = (targets[i:i + n] != -1).unsqueeze(1).to(torch.float32)
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
                        g[rows].copy_(probs.mul_(weight[rows]))  # ignored rows: no gradient
            if need_grad:
                grad_h[i:i + n] = (g @ w_c).to(h.dtype)
                part = h_c.t() @ g
                grad_wt = part if grad_wt is None else grad_wt.float().add_(part)
        ctx.save_for_backward(grad_h, grad_wt)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_wt = ctx.saved_tensors
        # (V, C) in w's own layout: a transposed gradient makes every later add slow
        grad_w = torch.empty(grad_wt.shape[::-1], dtype=ctx.w_dtype, device=grad_wt.device)
        grad_w.copy_(grad_wt.t()).mul_(grad_out)
        return grad_h * grad_out, grad_w, None, None, None, None, None, None


def head_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                       reduction: str = "mean", chunk: int | None = None,
                       tile: int | None = None, block: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(h @ w.T, targets, ignore_index=-1)`` without the full fp32 logits.

    Under autocast the matmuls run in the autocast dtype; the softmax is always fp32.
    Sizes in rows: ``chunk`` rows share the gradient matmuls (by default up to 128M
    logits on the CPU, all rows of a typical batch; 32M on a GPU, where the whole chunk's
    fp32 softmax exists at once). On the CPU the logits are made ``tile`` rows at a time
    (about 8M logits, which fit in a large L3 cache) and the softmax takes ``block`` rows at
    a time (about 1M logits, for L2). On a GPU, tile and block default to the chunk.
    """
    V = w.size(0)
    on_cpu = h.device.type == "cpu"
    chunk = chunk or max(256, (1 << (27 if on_cpu else 25)) // V)
    tile = tile or (max(1, (1 << 23) // V) if on_cpu else chunk)
    block = block or (max(1, (1 << 20) // V) if on_cpu else tile)
    dtype = (torch.get_autocast_dtype(h.device.type)
             if torch.is_autocast_enabled(h.device.type) else h.dtype)
    # not ctx.needs_input_grad, which is true under no_grad too: validation would pay for
    # the two gradient matmuls
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        total = _ChunkedHeadLoss.apply(h, w, targets, dtype, chunk, tile, block, need_grad)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != -1).sum().clamp(min=1)
    raise ValueError(f"unsupported reduction {reduction!r}")


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size is not None, "vocab_size must be resolved before building"
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.embed_dim),
            wpe=nn.Embedding(cfg.max_seq_length, cfg.embed_dim),
            drop=Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)]),
            ln_f=nn.LayerNorm(cfg.embed_dim, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self._head_loss = head_cross_entropy
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by depth so the residual stream stays unit-size
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Exact count of trainable numbers; the tied head is counted once."""
        return sum(p.numel() for p in self.parameters())

    def param_groups_breakdown(self) -> dict[str, int]:
        """Parameter counts per component, for ``inspect model``."""
        out = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0}
        for name, p in self.named_parameters():
            if ".wte." in f".{name}" or ".wpe." in f".{name}":
                out["embeddings"] += p.numel()
            elif ".attn." in name:
                out["attention"] += p.numel()
            elif ".mlp." in name:
                out["mlp"] += p.numel()
            else:
                out["norms"] += p.numel()
        return out

    def new_cache(self, batch_size: int) -> KVCache:
        w = self.transformer.wte.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(
            w.device.type) else w.dtype
        return KVCache(self.config, batch_size, w.device, dtype)

    def features(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, C) that the head turns into logits.

        With ``cache``, ``idx`` continues the cached sequence and the cache is extended.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.max_seq_length, (
            f"sequence of {start + T} exceeds context {self.config.max_seq_length}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean"):
        """Logits for every position of ``idx`` (B, T) and, given targets, the loss.

        With ``cache``, ``idx`` continues the cached sequence. Targets equal to -1 are ignored.
        """
        x = self.features(idx, cache)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        # The (B*T, V) logits are the largest tensor by far: compute the loss chunk by chunk
        # instead, and return no logits.
        loss = self._head_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight,
                               targets.reshape(-1), reduction)
        return None, loss

    def compile_for_training(self) -> nn.Module:
        """This model under ``torch.compile``, sharing its weights. The chunked head loss
        stays eager: its loops and data-dependent mask would only break the graph."""
        self._head_loss = torch.compiler.disable(head_cross_entropy)  # imports torch._dynamo
        return torch.compile(self)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices, never biases, norms or embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.dim() >= 2 and "wte" not in name and "wpe" not in name
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

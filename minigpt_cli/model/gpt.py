"""The GPT: pre-LN transformer blocks, learned positions, tied embeddings.

Written bottom-up in nanoGPT's spirit, with GPT-2's parameter names so weights map one to
one onto GPT-2 checkpoints. The fast paths it calls (CPU dropout, written-out attention,
the chunked head loss) live in ``kernels.py``. Shapes use B (batch), T (time),
C (embed_dim), H (heads), D (head_dim), V (vocab). No I/O and no printing here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt_cli.config import ModelConfig
from minigpt_cli.model.kernels import Dropout, attention, head_cross_entropy


@dataclass
class LayerCache:
    """Keys and values of one attention layer for incremental decoding."""

    k: torch.Tensor  # (B, H, T_max, D)
    v: torch.Tensor  # (B, H, T_max, D)


class KVCache:
    """Pre-allocated keys/values for every layer; ``length`` tokens are filled.

    With ``lengths`` (B,) set, every row has its own length instead (continuous batching:
    rows at different positions decode together, one new token each, see ``features``).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype):
        shape = (batch_size, cfg.num_heads, cfg.max_seq_length, cfg.head_dim)
        # zeros, not empty: per-row lengths let a row's attention span slots it never
        # filled (masked out, but 0 * NaN from uninitialised memory would still be NaN)
        self.layers = [
            LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)
        ]
        self.length = 0
        self.lengths: torch.Tensor | None = None
        self.capacity = cfg.max_seq_length

    def reset(self) -> None:
        self.length = 0
        self.lengths = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` (B, T, C), each (B, H, T, D)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                start: int | torch.Tensor = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        mask, causal = None, True
        if isinstance(start, torch.Tensor):  # one new token per row, each at its own position
            rows = torch.arange(B, device=x.device)
            cache.k[rows, :, start] = k[:, :, 0]
            cache.v[rows, :, start] = v[:, :, 0]
            S = int(start.max()) + 1
            k, v = cache.k[:B, :, :S], cache.v[:B, :, :S]
            mask = (torch.arange(S, device=x.device) <= start[:, None])[:, None, None]  # (B,1,1,S)
            causal = False
        elif cache is not None:
            cache.k[:B, :, start:start + T] = k
            cache.v[:B, :, start:start + T] = v
            k, v = cache.k[:B, :, :start + T], cache.v[:B, :, :start + T]
            if start > 0:
                causal = False
                if T > 1:  # new queries see all cached keys plus their own past
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = attention(q, k, v, mask, causal, self.dropout, self.training)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, H, T, T) that ``forward`` applies to the values: row i
        of a head says how much query i attends to each key j <= i (it sums to one)."""
        q, k, _ = self.qkv(x)
        T = q.size(-2)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


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
                start: int | torch.Tensor = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """What this block's attention does with its input ``x`` (B, T, C): (B, H, T, T)."""
        return self.attn.weights(self.ln_1(x))


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

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Token plus position embeddings (B, T, C) of ``idx`` (B, T), whose first token
        sits at position ``start`` (or ``start[b]`` in row b)."""
        T = idx.size(1)
        last = int(start.max()) if isinstance(start, torch.Tensor) else start
        assert last + T <= self.config.max_seq_length, (
            f"sequence of {last + T} exceeds context {self.config.max_seq_length}")
        pos = start[:, None] + torch.arange(T, device=idx.device) \
            if isinstance(start, torch.Tensor) else \
            torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def features(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, C) that the head turns into logits.

        With ``cache``, ``idx`` continues the cached sequence and the cache is extended.
        With per-row ``cache.lengths``, ``idx`` is (B, 1): row b's token goes at position
        ``lengths[b]`` and attends to that row's cached keys only.
        """
        start = 0 if cache is None else cache.length if cache.lengths is None else cache.lengths
        if isinstance(start, torch.Tensor):
            assert idx.size(1) == 1 and idx.size(0) == start.size(0), "one token per row"
        x = self.embed(idx, start)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layers[i] if cache is not None else None, start)
        if isinstance(start, torch.Tensor):
            cache.lengths = start + 1
        elif cache is not None:
            cache.length = start + idx.size(1)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean"):
        """``(logits, None)`` for ``idx`` (B, T), or ``(None, loss)`` given ``targets``.

        Without targets: the logits (B, T, V) of every position. With targets (B, T), ids
        of the next tokens with -1 where a position is not scored: the cross-entropy,
        averaged over the scored positions (``reduction="mean"``) or summed ("sum"), and no
        logits. The (B*T, V) logits are by far the largest tensor of a training step, so
        the loss is computed from the hidden states a chunk at a time
        (``kernels.head_cross_entropy``) and the full logits never exist.
        With ``cache``, ``idx`` continues the cached sequence.
        """
        x = self.features(idx, cache)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        loss = self._head_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight,
                               targets.reshape(-1), reduction)
        return None, loss

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """Every head's attention weights (B, H, T, T) in ``layer`` for ``idx`` (B, T)."""
        assert 0 <= layer < self.config.num_layers, f"no layer {layer}"
        x = self.embed(idx)
        for block in self.transformer.h[:layer]:
            x = block(x)
        return self.transformer.h[layer].attention_weights(x)

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

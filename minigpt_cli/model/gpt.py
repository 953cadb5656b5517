"""The GPT: pre-LN transformer blocks, learned positions, tied embeddings.

Written bottom-up in nanoGPT's spirit, with GPT-2's parameter names so weights map one to
one onto GPT-2 checkpoints. The fast paths it calls (CPU dropout, written-out attention,
the chunked head loss) live in ``kernels.py``. Shapes use B (batch), T (time),
C (embed_dim), H (heads), K (kv heads), D (head_dim), V (vocab). No I/O and no printing.

The config may name Llama's parts instead (``model.position: rope``, ``model.norm:
rmsnorm``, ``model.mlp: swiglu``, ``model.num_kv_heads``): the mappings below turn the
names into modules from ``layers.py``, so ``Block`` composes them and never branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt_cli.config import ModelConfig
from minigpt_cli.model.kernels import Dropout, attention, head_cross_entropy
from minigpt_cli.model.layers import NoRotation, RMSNorm, Rotary, SwiGLU


@dataclass
class LayerCache:
    """Keys and values of one attention layer for incremental decoding."""

    k: torch.Tensor  # (B, K, T_max, D): only the kv heads
    v: torch.Tensor  # (B, K, T_max, D)


class KVCache:
    """Pre-allocated keys/values for every layer; ``length`` tokens are filled.

    With ``lengths`` (B,) set, every row has its own length instead (continuous batching:
    rows at different positions decode together, one new token each, see ``features``).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype):
        shape = (batch_size, cfg.kv_heads, cfg.max_seq_length, cfg.head_dim)
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


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return NORMS[cfg.norm](cfg, dim or cfg.embed_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.kv_heads, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        # queries, then the keys and values of the kv heads (each shared by H / K queries)
        self.sizes = (cfg.embed_dim, self.kv_heads * D, self.kv_heads * D)
        self.c_attn = nn.Linear(cfg.embed_dim, sum(self.sizes), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        self.q_norm, self.k_norm = ((make_norm(cfg, D), make_norm(cfg, D)) if cfg.qk_norm
                                    else (nn.Identity(), nn.Identity()))
        self.rotary = POSITIONS[cfg.position](cfg)
        # plain flags: skipping the no-op modules saves a call each per layer and token
        self.qk_norm, self.rotates = cfg.qk_norm, cfg.position != "learned"

    def qkv(self, x: torch.Tensor, start: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, T, D) of ``x`` (B, T, C), whose
        first token sits at position ``start``."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.num_heads, -1)
        k = k.view(B, T, self.kv_heads, -1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rotates:
            q, k = self.rotary(q, k, start)
        return q, k, v.view(B, T, self.kv_heads, -1).transpose(1, 2)

    def share_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, K, S, D) keys or values as (B, H, S, D): query head h reads kv head h // (H/K)."""
        groups = self.num_heads // self.kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                start: int | torch.Tensor = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, start)
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
        k, v = self.share_kv(k), self.share_kv(v)
        y = attention(q, k, v, mask, causal, self.dropout, self.training)  # (B, H, T, D)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return self.resid_dropout(y) if self.training else y

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, H, T, T) that ``forward`` applies to the values: row i
        of a head says how much query i attends to each key j <= i (it sums to one)."""
        q, k, _ = self.qkv(x)
        k = self.share_kv(k)
        T = q.size(-2)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.embed_dim, cfg.ff_width, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(cfg.ff_width, cfg.embed_dim, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.gelu(self.c_fc(x)))
        return self.dropout(y) if self.training else y


# The variants a config names (config.POSITIONS, NORMS, MLPS), as modules.
POSITIONS = {
    "learned": lambda cfg: NoRotation(),  # GPT.transformer.wpe adds them to the input
    "rope": lambda cfg: Rotary(cfg.head_dim, cfg.max_seq_length, cfg.rope_theta),
}
NORMS = {
    "layernorm": lambda cfg, dim: nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias),
    "rmsnorm": lambda cfg, dim: RMSNorm(dim, eps=cfg.norm_eps),
}
MLPS = {
    "gelu": MLP,
    "swiglu": lambda cfg: SwiGLU(cfg.embed_dim, cfg.ff_width, cfg.bias, cfg.dropout),
}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

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
            ln_f=make_norm(cfg),
        ))
        if cfg.position != "learned":  # rotary positions live in the attention
            del self.transformer["wpe"]
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
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
        """Exact count of the model's weights; the tied head is counted once. A linear
        layer that quantisation replaced (weights held as buffers) counts as the layer."""
        n = sum(p.numel() for p in self.parameters())
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) or not hasattr(m, "dequantize"):
                continue
            if name != "lm_head" or not self.config.tie_embeddings:
                n += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
        return n

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.transformer.wte.weight

    def param_groups_breakdown(self) -> dict[str, int]:
        """Parameter counts per component, for ``inspect model``."""
        out = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0}
        for name, p in self.named_parameters():
            if ".wte." in f".{name}" or ".wpe." in f".{name}" or name.startswith("lm_head"):
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
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            pos = (start[:, None] + torch.arange(T, device=idx.device)
                   if isinstance(start, torch.Tensor) else
                   torch.arange(start, start + T, dtype=torch.long, device=idx.device))
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x) if self.training else x

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

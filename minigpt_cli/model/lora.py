"""LoRA: low-rank adapters beside the frozen projections of a base model.

A wrapped projection computes ``W x + b + (B A dropout(x)) * alpha / rank``, with ``A``
(rank, in) drawn as PEFT draws it (Kaiming-uniform) and ``B`` (out, rank) zero, so a fresh
adapter changes nothing. The wrapper is an ``nn.Linear`` that keeps the base's ``weight``
and ``bias`` under their own names and adds ``lora_A`` and ``lora_B`` beside them: the base
weights load into a wrapped model unchanged, and the adapters are the parameters whose name
holds ``.lora_``. Targets are module names or name endings, as PEFT's ``target_modules``.
No I/O here.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt_cli.config import LoraConfig, ModelConfig
from minigpt_cli.errors import ConfigError
from minigpt_cli.model.gpt import GPT
from minigpt_cli.model.kernels import Dropout

ADAPTER_MARK = ".lora_"  # in the name of every adapter tensor
ADDED_ROWS = "added_rows."  # checkpoint keys of embedding rows the base lacks (new tokens)
VOCAB_KEYS = ("transformer.wte.weight", "lm_head.weight")
BLOCKS = "transformer.h."  # adapters go on the projections inside the blocks


class LoRALinear(nn.Linear):
    """``base`` (its own weight and bias, not copies) plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device,
                                               dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device,
                                               dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and nn.Linear
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """What the adapter adds to ``weight`` (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, target: str) -> bool:
    """A projection's full name, its ending (``c_attn``, ``attn.c_proj``), or a module it
    lies in (``attn``, ``mlp``: every projection there, whatever the variant has)."""
    return name == target or name.endswith("." + target) or f".{target}." in f".{name}"


def target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The projections ``cfg.targets`` names; a target that names none is a ConfigError."""
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.startswith(BLOCKS)]
    found: list[str] = []
    for target in cfg.target_list:
        hits = [name for name in candidates if _matches(name, target)]
        if not hits:
            known = sorted({name.split(".", 3)[-1] for name in candidates})
            raise ConfigError(f"lora.targets: '{target}' matches no module of the model",
                              f"its projections are {', '.join(known)}")
        found += [h for h in hits if h not in found]
    return sorted(found, key=candidates.index)


def check_targets(model_cfg: ModelConfig, cfg: LoraConfig) -> list[str]:
    """``target_names`` for the model of ``model_cfg``, without building its weights."""
    with torch.device("meta"):
        return target_names(GPT(model_cfg), cfg)


def inject(model: GPT, cfg: LoraConfig) -> list[str]:
    """Wrap the targeted projections of ``model`` in adapters and freeze everything else;
    returns the wrapped modules' names."""
    assert cfg.enabled, "inject needs lora.rank > 0"
    names = target_names(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha,
                                          cfg.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(name: str) -> bool:
    return ADAPTER_MARK in name


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a state dict."""
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def merge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: GPT) -> GPT:
    """``model`` with each adapter merged into its projection and the wrappers replaced by
    plain ``nn.Linear`` layers: the same function, as an ordinary GPT."""
    for name, m in lora_modules(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """The sha256 of a set of weights: every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of ``model``; a tied tensor counts once, and of an
    embedding with new tokens only their rows are trainable."""
    params = list(model.parameters())
    trainable = sum(p.numel() - getattr(p, "frozen_rows", 0) * p[0].numel()
                    for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


# ---- tokens the base lacks (a chat template's) --------------------------------------------

def grow_vocab_rows(state_dict: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Make room for new tokens in a base's weights, in place: new rows of the embedding
    (and of an untied head) start at the mean of the existing ones, so they are the same
    wherever the base is grown again."""
    for key in VOCAB_KEYS:
        w = state_dict.get(key)
        if w is not None and w.size(0) < vocab_size:
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab_size - w.size(0),
                                                                       -1)
            state_dict[key] = torch.cat([w, extra])


def _vocab_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The embedding and, when untied, the head: the tensors with a row per token."""
    out: dict[str, nn.Parameter] = {}
    for key in VOCAB_KEYS:
        p = model.get_parameter(key)
        if all(p is not q for q in out.values()):
            out[key] = p
    return out


def train_added_rows(model: nn.Module, base_vocab: int) -> None:
    """Train the rows of tokens the base lacks beside the adapters; the base's own rows get
    no gradient, so AdamW (no decay on embeddings) leaves them bit-identical."""
    for p in _vocab_params(model).values():
        if p.size(0) > base_vocab:
            p.requires_grad_(True)
            p.frozen_rows = base_vocab
            p.register_hook(lambda g, n=base_vocab: torch.cat([g[:n].zero_(), g[n:]]))


def checkpoint_state(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     base_vocab: int | None) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the adapters, and the rows of tokens the base lacks."""
    out = adapter_state(state_dict)
    if base_vocab is not None:
        for key, p in _vocab_params(model).items():
            if p.size(0) > base_vocab:
                out[ADDED_ROWS + key] = state_dict[key][base_vocab:]
    return out


def load_added_rows(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put the checkpoint's new-token rows (popped from ``weights``) into ``model``."""
    params = _vocab_params(model)
    for key in [k for k in weights if k.startswith(ADDED_ROWS)]:
        rows = weights.pop(key)
        p = params.get(key[len(ADDED_ROWS):])
        if p is None or rows.size(0) > p.size(0) or rows.shape[1:] != p.shape[1:]:
            raise ValueError(f"{key} {tuple(rows.shape)} does not fit the model")
        with torch.no_grad():
            p[p.size(0) - rows.size(0):] = rows

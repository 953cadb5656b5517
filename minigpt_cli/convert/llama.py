"""A modern-variant run as a Hugging Face Llama folder, and Llama checkpoints as runs.

minigpt with ``model.position: rope``, ``model.norm: rmsnorm`` and ``model.mlp: swiglu``
computes what ``LlamaForCausalLM`` computes, grouped-query attention and an untied head
included. Its rotary embedding uses the same rotate-half layout as transformers, so no
weight is permuted: ``c_attn`` is cut into ``q_proj | k_proj | v_proj``, and the SwiGLU's
``c_gate``, ``c_fc``, ``c_proj`` are ``gate_proj``, ``up_proj``, ``down_proj``. No
printing here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minigpt_cli import __version__
from minigpt_cli.config import ModelConfig
from minigpt_cli.convert.hf import Checkpoint, read_config, read_weights
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT

ARCHITECTURE = "LlamaForCausalLM"
GPT2 = dict(position="learned", norm="layernorm", mlp="gelu", qk_norm=False)
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False)
LAYER = "model.layers.{}."
# minigpt's name in a block -> Llama's (c_attn is cut in three, see below)
BLOCK_NAMES = {"attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj",
               "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
TOP_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
QKV = ("q_proj", "k_proj", "v_proj")


def family(cfg: ModelConfig) -> str:
    """``gpt2`` or ``llama``: the Hugging Face architecture that computes what ``cfg``'s
    model computes; any other mix is a ConvertError naming the settings at fault."""
    if cfg.qk_norm:
        raise ConvertError("model.qk_norm has no Hugging Face GPT-2 or Llama counterpart",
                           "export a model trained without it", setting="model.qk_norm")
    gpt2 = [(f"model.{k}", getattr(cfg, k), v) for k, v in GPT2.items() if getattr(cfg, k) != v]
    if cfg.kv_heads != cfg.num_heads:  # GPT-2's attention has one key and value per head
        gpt2.append(("model.num_kv_heads", cfg.num_kv_heads,
                     f"null (all {cfg.num_heads} heads)"))
    llama = [(f"model.{k}", getattr(cfg, k), v) for k, v in LLAMA.items()
             if getattr(cfg, k) != v]
    if not gpt2:
        return "gpt2"
    if not llama:
        return "llama"
    (faults, near), (others, far) = sorted([(gpt2, "GPT-2"), (llama, "Llama")],
                                           key=lambda d: len(d[0]))
    have = ", ".join(f"{key} {value}" for key, value, _ in faults)
    needs = ", ".join(f"{key} {wanted}" for key, _, wanted in faults)
    other = ", ".join(f"{key} {wanted}" for key, _, wanted in others)
    raise ConvertError(f"{have} cannot be exported as {near}, which needs {needs}; {far} "
                       f"needs {other}", "export models of one of the two designs",
                       setting=faults[0][0])


# ---- minigpt -> Llama -------------------------------------------------------------------------

def llama_config(cfg: ModelConfig, eot_id: int, tied: bool) -> dict[str, Any]:
    """``config.json`` of the Llama that computes what ``cfg``'s model computes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.ff_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_length,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "dtype": "float32",
        "minigpt": {"version": __version__},
    }


def to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Llama's names (the tied head left out)."""
    cfg = model.config
    sizes = (cfg.embed_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to(torch.float32)
        if name in TOP_NAMES:
            if name != "lm_head.weight" or not model.tied:
                out[TOP_NAMES[name]] = t.contiguous()
            continue
        _, _, i, rest = name.split(".", 3)  # transformer.h.I.REST
        module, kind = rest.rsplit(".", 1)
        prefix = LAYER.format(i)
        if module == "attn.c_attn":
            for part, piece in zip(QKV, t.split(sizes, dim=0), strict=True):
                out[f"{prefix}self_attn.{part}.{kind}"] = piece.contiguous()
        else:
            out[f"{prefix}{BLOCK_NAMES[module]}.{kind}"] = t.contiguous()
    return dict(sorted(out.items()))


def to_llama_adapter(adapters: dict[str, torch.Tensor], cfg: ModelConfig
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA adapters (``<module>.lora_A`` / ``.lora_B`` of minigpt's modules) as PEFT names
    them on the Llama export, and the target module names. The fused ``c_attn``'s adapter
    becomes one per projection: each keeps the shared A and takes its rows of B, which
    computes exactly the same update."""
    sizes = (cfg.embed_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for key, tensor in adapters.items():
        module, _, which = key.rpartition(".")  # transformer.h.I.REST, lora_A | lora_B
        _, _, i, rest = module.split(".", 3)
        prefix = f"base_model.model.{LAYER.format(i)}"
        t = tensor.detach().to("cpu", torch.float32)
        if rest == "attn.c_attn":
            pieces = t.split(sizes, dim=0) if which == "lora_B" else (t, t.clone(), t.clone())
            names = [f"self_attn.{part}" for part in QKV]
        else:
            pieces, names = (t,), [BLOCK_NAMES[rest]]
        for name, piece in zip(names, pieces, strict=True):
            out[f"{prefix}{name}.{which}.weight"] = piece.contiguous()
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                targets.append(leaf)
    return dict(sorted(out.items())), targets


# ---- Llama -> minigpt -------------------------------------------------------------------------

def model_config(raw: dict[str, Any], origin: str) -> ModelConfig:
    """minigpt's ModelConfig for a Llama ``config.json``; anything minigpt's model would
    compute differently is a ConvertError naming it."""

    def get(key: str, default: Any = None) -> Any:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConvertError(f"{origin}: '{key}' in config.json must be a positive integer, "
                               f"got {value!r}")
        return value

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value):
            raise ConvertError(f"{origin}: '{key}' in config.json must be a number, "
                               f"got {value!r}")
        return float(value)

    embed, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads", heads)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConvertError(f"{origin}: 'rope_parameters' in config.json must be an object, "
                           f"got {rope!r}")
    theta = number("rope_theta", rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    head_dim = raw.get("head_dim") or embed // heads
    checks = [
        (raw.get("hidden_act", "silu") == "silu", f"hidden_act {raw.get('hidden_act')!r}"),
        (rope.get("rope_type", rope.get("type", "default")) == "default",
         f"rope scaling {rope.get('rope_type', rope.get('type'))!r}"),
        (embed % heads == 0 and head_dim == embed // heads, f"head_dim {head_dim}"),
        (raw.get("attention_bias", False) == raw.get("mlp_bias", False),
         "biases in the attention but not the MLP (or the other way round)"),
        (not raw.get("pretraining_tp", 1) or raw.get("pretraining_tp", 1) == 1,
         "pretraining_tp"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConvertError(f"{origin} uses {what}, which minigpt's model does not compute")
    eps = number("rms_norm_eps", raw.get("rms_norm_eps", 1e-6))
    cfg = ModelConfig(vocab_size=get("vocab_size"),
                      max_seq_length=get("max_position_embeddings"), embed_dim=embed,
                      num_heads=heads, num_layers=get("num_hidden_layers"),
                      ff_dim=get("intermediate_size"),
                      dropout=min(max(number("attention_dropout",
                                             raw.get("attention_dropout") or 0.0), 0.0), 0.99),
                      bias=bool(raw.get("attention_bias", False)), **LLAMA,
                      rope_theta=float(theta),
                      num_kv_heads=kv_heads if kv_heads != heads else None,
                      tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                      norm_eps=eps)
    if math.isnan(eps) or eps <= 0:
        raise ConvertError(f"{origin}: rms_norm_eps {eps} is not positive")
    try:
        cfg.validate()
    except Exception as e:
        raise ConvertError(f"{origin}: {e}") from e
    return cfg


def from_llama_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig,
                          origin: str) -> dict[str, torch.Tensor]:
    """Llama tensors under minigpt's names, checked against the shapes of ``cfg``'s model."""
    with torch.device("meta"):  # shapes only
        skeleton = GPT(cfg)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()
                if k != "lm_head.weight" or not skeleton.tied}
    theirs = {}
    for name in expected:
        if name in TOP_NAMES:
            theirs[name] = [TOP_NAMES[name]]
            continue
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        prefix = LAYER.format(i)
        theirs[name] = ([f"{prefix}self_attn.{p}.{kind}" for p in QKV] if module == "attn.c_attn"
                        else [f"{prefix}{BLOCK_NAMES[module]}.{kind}"])
    used = {n for names in theirs.values() for n in names}
    extra = sorted(n for n in weights if n not in used and not n.endswith("rotary_emb.inv_freq")
                   and not (n == "lm_head.weight" and skeleton.tied))
    if extra:
        raise ConvertError(f"{origin}: unexpected tensor {extra[0]}",
                           "is this a LlamaForCausalLM checkpoint?")
    out: dict[str, torch.Tensor] = {}
    for name, names in theirs.items():
        missing = [n for n in names if n not in weights]
        if missing:
            raise ConvertError(f"{origin}: the checkpoint lacks {missing[0]}")
        t = torch.cat([weights[n].to(torch.float32) for n in names], dim=0).contiguous()
        if t.shape != expected[name]:
            raise ConvertError(f"{origin}: {names[0]} has shape "
                               f"{tuple(weights[names[0]].shape)}, which does not fit "
                               "config.json")
        out[name] = t
    head = weights.get("lm_head.weight")
    if skeleton.tied and head is not None and not torch.equal(
            head.float(), out["transformer.wte.weight"]):
        raise ConvertError(f"{origin}: lm_head.weight differs from the token embedding but "
                           "config.json says they are tied")
    return out


def read_checkpoint(folder, origin: str | None = None) -> Checkpoint:
    """A Llama-family Hugging Face folder as minigpt's config and weights."""
    origin = origin or str(folder)
    cfg = model_config(read_config(folder), origin)
    return Checkpoint(cfg, from_llama_state_dict(read_weights(folder), cfg, origin), folder)

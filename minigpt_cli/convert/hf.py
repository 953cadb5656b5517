"""A run as a Hugging Face GPT-2 folder, and GPT-2-family checkpoints as minigpt runs.

minigpt's GPT uses GPT-2's parameter names, so the mapping is one to one: only the four
projection matrices of each block change layout, because GPT-2 stores them as ``Conv1D``
(in, out) where minigpt has ``nn.Linear`` (out, in). A model without biases exports zero
biases, which is exact; the exported ``config.json`` says so (``minigpt.bias``), so that
importing it back gives the same model. The output head is tied to the embedding unless
``model.tie_embeddings`` is false (``tie_word_embeddings`` in ``config.json``), and the
norms' epsilon is ``model.norm_eps`` (``layer_norm_epsilon``).

Writing needs only safetensors; reading a ``pytorch_model.bin`` uses
``torch.load(weights_only=True)``, which never unpickles objects. No printing here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt_cli import __version__
from minigpt_cli.config import ModelConfig
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT

ARCHITECTURE = "GPT2LMHeadModel"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")
LAYER_NORM_EPS = 1e-5  # GPT-2's own, and model.norm_eps's default
PREFIX = "transformer."
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints


# ---- minigpt -> GPT-2 -------------------------------------------------------------------------

def gpt2_config(cfg: ModelConfig, eot_id: int) -> dict[str, Any]:
    """``config.json`` of the GPT-2 that computes what ``cfg``'s model computes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_length,
        "n_embd": cfg.embed_dim,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.ff_dim,
        "activation_function": "gelu_pytorch_tanh",  # GELU, tanh approximation, as torch
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "minigpt": {"version": __version__, "bias": cfg.bias},
    }


def to_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT-2's names and layouts (a tied head left out, as
    transformers saves it); zero biases where the model has none."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.tied:
            continue
        t = tensor.detach().to(torch.float32)
        out[name] = (t.t() if name.endswith(CONV1D) else t).contiguous()
    if not cfg.bias:  # GPT-2 always has biases: zeros are exactly no bias
        for name in list(out):
            if name.endswith(".weight") and _has_bias_in_gpt2(name):
                out[name[:-len("weight")] + "bias"] = torch.zeros(
                    _bias_size(name, out[name]), dtype=torch.float32)
    return dict(sorted(out.items()))


def _has_bias_in_gpt2(name: str) -> bool:
    return name.endswith(CONV1D) or ".ln_" in name


def _bias_size(name: str, weight: torch.Tensor) -> int:
    # Conv1D weights are (in, out): the bias has `out` entries; a norm's bias is its size
    return weight.size(1) if name.endswith(CONV1D) else weight.size(0)


# ---- GPT-2 -> minigpt -------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A GPT-2-family checkpoint read from a folder, in minigpt's terms."""

    model: ModelConfig
    state_dict: dict[str, torch.Tensor]  # minigpt's names and layouts
    folder: Path


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder} has no config.json",
                           "pass a Hugging Face model folder (save_pretrained's output), "
                           "hf:NAME or a minigpt run directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is not valid JSON") from e
    if not isinstance(raw, dict):
        raise ConvertError(f"{path} is not a model config")
    return raw


def model_config(raw: dict[str, Any], origin: str) -> ModelConfig:
    """minigpt's ModelConfig for a GPT-2 ``config.json``; anything minigpt's model would
    compute differently is a ConvertError naming it."""
    kind = raw.get("model_type")
    archs = raw.get("architectures") or []
    if kind != "gpt2":
        what = f"a {kind} model" if kind else "not a model config minigpt knows"
        arch = f" ({', '.join(map(str, archs))})" if archs else ""
        raise ConvertError(f"{origin} is {what}{arch}, not GPT-2",
                           "minigpt imports GPT-2 (GPT2LMHeadModel) and Llama "
                           "(LlamaForCausalLM) checkpoints")

    def get(key: str, kind: type = int) -> Any:
        if key not in raw:
            raise ConvertError(f"{origin}: config.json has no '{key}'",
                               "a GPT-2 config.json needs n_embd, n_layer, n_head, "
                               "n_positions and vocab_size")
        value = raw[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConvertError(f"{origin}: '{key}' in config.json must be a positive integer, "
                               f"got {value!r}")
        return value

    embed = get("n_embd")
    checks = [
        (raw.get("activation_function", "gelu_new") in TANH_GELUS,
         f"activation_function {raw.get('activation_function')!r} (minigpt's GELU is the tanh "
         "approximation)"),
        (not raw.get("scale_attn_by_inverse_layer_idx", False),
         "scale_attn_by_inverse_layer_idx"),
        (raw.get("scale_attn_weights", True), "scale_attn_weights off"),
        (not raw.get("add_cross_attention", False), "cross-attention"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConvertError(f"{origin} uses {what}, which minigpt's GPT does not compute")
    heads = get("n_head")
    if embed % heads:
        raise ConvertError(f"{origin}: n_embd {embed} is not divisible by n_head {heads}")
    inner = raw.get("n_inner")
    bias = (raw.get("minigpt") or {}).get("bias", True) is not False
    eps = raw.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf:
        raise ConvertError(f"{origin}: 'layer_norm_epsilon' in config.json must be a positive "
                           f"number, got {eps!r}")
    dropout = raw.get("resid_pdrop") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or \
            not math.isfinite(dropout):
        raise ConvertError(f"{origin}: 'resid_pdrop' in config.json must be a number, got "
                           f"{dropout!r}")
    cfg = ModelConfig(vocab_size=get("vocab_size"), max_seq_length=get("n_positions"),
                      embed_dim=embed, num_heads=heads, num_layers=get("n_layer"),
                      ff_dim=inner if isinstance(inner, int) and inner > 0 else 4 * embed,
                      dropout=float(dropout), bias=bias,
                      norm_eps=float(eps),
                      tie_embeddings=raw.get("tie_word_embeddings", True) is not False)
    cfg.dropout = min(max(cfg.dropout, 0.0), 0.99)
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder: safetensors (one file or shards), else a
    ``pytorch_model.bin`` loaded with ``weights_only=True``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (folder / WEIGHTS_FILE).is_file():
            return load_file(str(folder / WEIGHTS_FILE))
        if (folder / WEIGHTS_INDEX).is_file():
            index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                if Path(shard).name != shard:
                    raise ConvertError(f"{folder / WEIGHTS_INDEX} names a file outside "
                                       f"{folder}: {shard}")
                out.update(load_file(str(folder / shard)))
            return out
        if (folder / PICKLE_WEIGHTS).is_file():
            return _load_tensors_only(folder / PICKLE_WEIGHTS)
    except ConvertError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"the weights in {folder} are unreadable: {first}",
                           "download or save the checkpoint again") from e
    raise ConvertError(f"{folder} has no weights ({WEIGHTS_FILE}, {WEIGHTS_INDEX} or "
                       f"{PICKLE_WEIGHTS})", "save the model with save_pretrained")


def _load_tensors_only(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` read with ``weights_only=True``: tensors, never objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if type(e).__name__ != "UnpicklingError":
            raise
        raise ConvertError(f"the weights in {path.parent} are unreadable: {path.name} holds "
                           "objects other than tensors, and minigpt never unpickles those",
                           "convert it to model.safetensors where it came from") from e


def from_gpt2_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig,
                         origin: str) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the ``transformer.`` prefix) under minigpt's names
    and layouts, checked against the shapes of ``cfg``'s model."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        skeleton = GPT(cfg)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()
                if k != "lm_head.weight" or not skeleton.tied}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith(SKIPPED) or (name == "lm_head.weight" and skeleton.tied):
            continue
        key = name if name.startswith(PREFIX) or name == "lm_head.weight" else PREFIX + name
        if key not in expected:
            if not cfg.bias and key.endswith(".bias"):
                if tensor.count_nonzero():
                    raise ConvertError(f"{origin}: {name} is not zero but config.json says the "
                                       "model has no biases")
                continue
            raise ConvertError(f"{origin}: unexpected tensor {name}",
                               "is this a GPT2LMHeadModel checkpoint?")
        t = tensor.to(torch.float32)
        out[key] = (t.t() if key.endswith(CONV1D) else t).contiguous()
        if out[key].shape != expected[key]:
            raise ConvertError(f"{origin}: {name} has shape {tuple(tensor.shape)}, which does "
                               "not fit config.json")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ConvertError(f"{origin}: the checkpoint lacks {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    head = weights.get("lm_head.weight")
    if skeleton.tied and head is not None and not torch.equal(
            head.float(), out[PREFIX + "wte.weight"]):
        raise ConvertError(f"{origin}: lm_head.weight differs from the token embedding but "
                           "config.json says they are tied")
    return out


def read_checkpoint(folder: Path, origin: str | None = None) -> Checkpoint:
    """A GPT-2-family Hugging Face folder as minigpt's config and weights."""
    origin = origin or str(folder)
    cfg = model_config(read_config(folder), origin)
    return Checkpoint(cfg, from_gpt2_state_dict(read_weights(folder), cfg, origin), folder)


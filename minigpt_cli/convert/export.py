"""``minigpt export``: a run's best checkpoint as a Hugging Face folder or a GGUF file.

A LoRA run exports with its adapters merged into the weights, or (``adapter_only``) as a
PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads onto the Hugging Face
export of its base.

Output is written under a temporary name beside ``out`` and renamed into place at the
end, so a failure leaves nothing behind, and an existing ``out`` is never replaced. Missing
folders above ``out`` are created, as ``import`` and ``train`` do (and removed on failure).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from minigpt_cli import __version__
from minigpt_cli.convert import hf, llama
from minigpt_cli.errors import ConvertError
from minigpt_cli.fileio import DIR_MODE, FILE_MODE, atomic_write_text
from minigpt_cli.run.layout import EVAL_FILE, is_run_dir
from minigpt_cli.run.load import LoadedRun

FORMATS = ("hf", "gguf")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GGUF_DTYPES = ("f32", "f16", "q8_0")
# minigpt generate's sampling defaults. Its 200 new tokens are left out: minigpt slides its
# window past the context, but transformers does not (a GPT-2's learned positions end there),
# so generation_config.json caps prompt and reply at the context instead (max_length).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0}


def check_out(out: Path, fmt: str, adapter_only: bool = False) -> None:
    """Refuse, before any work, an ``out`` that exists or cannot be written."""
    if fmt not in FORMATS:
        raise ConvertError(f"format {fmt} is unknown", f"use {' or '.join(FORMATS)}",
                           setting="format")
    if adapter_only and fmt != "hf":
        raise ConvertError(f"adapter_only writes a PEFT adapter folder, not {fmt}",
                           "use format hf", setting="adapter_only")
    if out.exists() or out.is_symlink():
        raise ConvertError(f"out {out} already exists", "choose a new path",
                           setting="out")
    parent = out.parent  # the nearest folder that exists: the rest is created
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        what = "a file" if parent.exists() else "a broken link"
        raise ConvertError(f"cannot write {out}: {parent} is {what}, not a folder",
                           "choose a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write {out}: the folder {parent} is not writable",
                           "choose a writable path")


@contextmanager
def _writing_beside(out: Path) -> Iterator[None]:
    """Create the missing folders above ``out`` for the block, and remove them again if it
    raises."""
    created = []  # nearest first: the order to remove them in
    for folder in out.parents:
        if folder.exists() or folder.is_symlink():
            break
        created.append(folder)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot write {out}: {e.strerror or e}",
                           "choose a writable path") from e
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def export(run: LoadedRun, out: Path, fmt: str, dtype: str = "f32",
           adapter_only: bool = False) -> Path:
    """Write ``run`` to ``out`` in format ``fmt`` (``hf`` or ``gguf``); with
    ``adapter_only``, a LoRA run's adapters alone, as PEFT saves them."""
    check_out(out, fmt, adapter_only)
    if adapter_only:
        if dtype != "f32":
            raise ConvertError("dtype applies to gguf; adapters are float32", "leave it out",
                               setting="dtype")
        return _export_adapter(run, out)
    llama.family(run.config.model)  # a mix neither format has: refused before any work
    if fmt == "gguf":
        if dtype not in GGUF_DTYPES:
            raise ConvertError(f"dtype {dtype} is unknown for gguf",
                               f"use {', '.join(GGUF_DTYPES)}", setting="dtype")
        return _export_gguf(run, out, dtype)
    if dtype != "f32":
        raise ConvertError(f"dtype {dtype} applies to gguf; hf folders are float32",
                           "leave it out", setting="dtype")
    return _export_hf(run, out)


def _export_hf(run: LoadedRun, out: Path) -> Path:
    from safetensors.torch import save_file

    from minigpt_cli.convert.hf_tokenizer import save_hf_tokenizer

    cfg = run.config.model

    def write(tmp: Path) -> None:
        save_hf_tokenizer(run.tokenizer, tmp, model_max_length=cfg.max_seq_length,
                          chat_template=_chat_template(run))
        if llama.family(cfg) == "llama":
            weights = llama.to_llama_state_dict(run.model)
            config = llama.llama_config(cfg, run.tokenizer.eot_id, run.model.tied)
        else:
            weights = hf.to_gpt2_state_dict(run.model)
            config = hf.gpt2_config(cfg, run.tokenizer.eot_id)
        save_file(weights, str(tmp / hf.WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(run))
        atomic_write_text(tmp / "README.md", model_card(run, out.name))
    return _write_folder(out, write)


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """``write`` the files of a new folder into a temporary one, then rename it to ``out``;
    a failure leaves nothing behind."""
    with _writing_beside(out):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            tmp.chmod(DIR_MODE)
            write(tmp)
            for path in tmp.iterdir():
                path.chmod(FILE_MODE)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def peft_adapter(run: LoadedRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` and the tensors of ``adapter_model.safetensors`` for PEFT.

    PEFT names a GPT-2 adapter ``base_model.model.<module>.lora_A.weight``; its lora_A and
    lora_B are ``nn.Linear`` layers even on GPT-2's ``Conv1D`` projections (that is what
    ``fan_in_fan_out`` says), so minigpt's (rank, in) and (out, rank) matrices go as they are.
    A Llama-style model's adapters take the Llama export's names (``llama.to_llama_adapter``).
    """
    if run.adapters is None:
        raise ConvertError(f"adapter_only: {run.run_dir} is not a LoRA run, it has no "
                           "adapters", "export it without adapter_only",
                           setting="adapter_only")
    if "vocab_size" in (run.state.get("base") or {}):
        raise ConvertError(f"adapter_only: {run.run_dir} added tokens (its chat template's) "
                           "to its base, which a PEFT adapter of the base cannot carry",
                           "export the merged model instead", setting="adapter_only")
    llama_family = llama.family(run.config.model) == "llama"
    tensors, modules = {}, []
    if llama_family:
        tensors, modules = llama.to_llama_adapter(run.adapters, run.config.model)
    for key, value in run.adapters.items() if not llama_family else ():
        module, _, which = key.rpartition(".")  # which: lora_A or lora_B
        tensors[f"base_model.model.{module}.{which}.weight"] = \
            value.detach().to("cpu", torch.float32).contiguous()
        if module not in modules:
            modules.append(module)
    lora_cfg = run.config.lora
    base = run.state.get("base") or {}
    source, path = str(base.get("source", "")), Path(str(base.get("path", "")))
    if source.startswith("hf:"):
        base_name = source[3:]
    elif base.get("path") and not is_run_dir(path):
        base_name = str(path)  # a Hugging Face folder
    else:
        base_name = None  # a minigpt run: its own `minigpt export` is the base
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "target_modules": modules, "fan_in_fan_out": not llama_family, "bias": "none",
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "inference_mode": True,
    }
    return config, dict(sorted(tensors.items()))


def _export_adapter(run: LoadedRun, out: Path) -> Path:
    from safetensors.torch import save_file

    config, tensors = peft_adapter(run)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / ADAPTER_CONFIG, config)
        atomic_write_text(tmp / "README.md", adapter_card(run, out.name, config))
    return _write_folder(out, write)


def adapter_card(run: LoadedRun, name: str, config: dict[str, Any]) -> str:
    base = run.state.get("base") or {}
    where = config["base_model_name_or_path"] or "BASE"
    return f"""---
library_name: peft
tags: [minigpt, lora]
---

# {name}

A LoRA adapter (rank {config["r"]}, alpha {config["lora_alpha"]:g}) trained with minigpt
{__version__} on {run.config.data.dataset}, for the base model {base.get("source", "?")}.
For a base that is a minigpt run, `minigpt export` that run to get the Hugging Face model.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{where}")
model = PeftModel.from_pretrained(base, "{name}")
```
"""


def _export_gguf(run: LoadedRun, out: Path, dtype: str) -> Path:
    from minigpt_cli.convert.gguf import export_gguf

    with _writing_beside(out):
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            export_gguf(run.model, run.tokenizer, tmp, dtype, name=run.run_dir.name,
                        chat_template=_chat_template(run))
            tmp.chmod(FILE_MODE)
            if out.exists():  # appeared meanwhile: never replace it
                raise ConvertError(f"out {out} already exists", "choose a new path",
                                   setting="out")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _chat_template(run: LoadedRun) -> str | None:
    """The Jinja chat template of a run fine-tuned on conversations, else None."""
    from minigpt_cli.chat.template import saved_template_name, template_for_run

    if saved_template_name(run.run_dir) is None:
        return None
    return template_for_run(run.run_dir).chat_template


def generation_config(run: LoadedRun) -> dict[str, Any]:
    eot = run.tokenizer.eot_id
    eos: int | list[int] = eot
    if _chat_template(run) is not None:
        from minigpt_cli.chat.template import template_for_run

        ends = template_for_run(run.run_dir).stop_ids(run.tokenizer)
        eos = [eot, *ends] if ends else eot  # generation ends at the end of a turn too
    config: dict[str, Any] = {"bos_token_id": eot, "eos_token_id": eos, "pad_token_id": eot,
                              **GENERATION_DEFAULTS,
                              "max_length": run.config.model.max_seq_length}
    extra = range(run.tokenizer.vocab_size, run.config.model.vocab_size)
    if len(extra):  # padding rows of the embedding: minigpt never samples them either
        config["suppress_tokens"] = list(extra)
    return config


def model_card(run: LoadedRun, name: str) -> str:
    """A README.md for the exported folder: where the model comes from and how to load it."""
    cfg, state = run.config, run.state
    m = cfg.model
    family = llama.family(m)
    design = "Llama" if family == "llama" else "GPT-2"
    best = state.get("best_val_loss")
    imported, base = state.get("imported_from"), cfg.train.init
    if imported:  # minigpt import: weights from elsewhere, never trained here
        origin = f"imported into minigpt from {imported}"
        rows = [("imported with", f"minigpt {__version__}"), ("source", str(imported))]
    else:
        lora = " with LoRA (adapters merged into the weights)" if cfg.lora.enabled else ""
        origin = (f"fine-tuned{lora} with minigpt from {base}" if base
                  else "trained from scratch with minigpt")
        rows = [("fine-tuned with" if base else "trained with", f"minigpt {__version__}"),
                *([("base model", base)] if base else []),
                ("data", cfg.data.dataset)]
    rows += [("tokenizer", f"{run.tokenizer.spec} ({run.tokenizer.vocab_size:,} tokens)"),
             ("architecture", architecture_summary(m)),
             ("parameters", f"{run.model.num_params():,}")]
    if not imported:
        rows += [("steps", f"{state.get('step', 0):,}"),
                 ("validation loss", "—" if best is None else f"{best:.4f} nats/token")]
    bpb = _bits_per_byte(run)
    if bpb is not None:
        rows.append(("bits per byte", f"{bpb:.4f} (minigpt eval, {cfg.data.dataset} val)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    source = str(imported or base or "")
    hub = f"\nbase_model: {source[3:]}" if source.startswith("hf:") else ""  # the Hub's link
    return f"""---
library_name: transformers
tags: [minigpt, {family}, text-generation]{hub}
---

# {name}

A {design}-style language model {origin}.

| | |
|---|---|
{table}

## Use it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("The", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))
```

`generation_config.json` holds minigpt's sampling defaults (temperature 0.8) and ends
generation at the model's context of {m.max_seq_length} tokens, prompt included
(`max_length`); pass `do_sample=False` for greedy decoding.
"""


def architecture_summary(m) -> str:
    if llama.family(m) == "llama":
        kv = f" ({m.kv_heads} kv heads)" if m.kv_heads < m.num_heads else ""
        return (f"Llama: {m.num_layers} layers, {m.embed_dim} wide, {m.num_heads} heads{kv}, "
                f"SwiGLU {m.ff_width}, context {m.max_seq_length}, rope theta {m.rope_theta:g}"
                + ("" if m.tie_embeddings else ", untied head"))
    return (f"GPT-2: {m.num_layers} layers, {m.embed_dim} wide, {m.num_heads} "
            f"heads, feed-forward {m.ff_dim}, context {m.max_seq_length}"
            + ("" if m.bias else ", no biases (exported as zeros)")
            + ("" if m.tie_embeddings else ", untied head"))


def _bits_per_byte(run: LoadedRun) -> float | None:
    try:
        results = json.loads((run.run_dir / EVAL_FILE).read_text(encoding="utf-8"))
        entry = results.get(f"{run.config.data.dataset}:val")
        value = entry.get("bits_per_byte") if isinstance(entry, dict) else None
        return float(value) if isinstance(value, (int, float)) else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")

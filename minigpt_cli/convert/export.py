"""``minigpt export``: a run's best checkpoint as a Hugging Face folder or a GGUF file.

Output is written under a temporary name beside ``out`` and renamed into place at the
end, so a failure leaves nothing behind, and an existing ``out`` is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from minigpt_cli import __version__
from minigpt_cli.convert import hf
from minigpt_cli.errors import ConvertError
from minigpt_cli.fileio import DIR_MODE, FILE_MODE, atomic_write_text
from minigpt_cli.run.layout import EVAL_FILE
from minigpt_cli.run.load import LoadedRun

FORMATS = ("hf", "gguf")
GGUF_DTYPES = ("f32", "f16", "q8_0")
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
                       "max_new_tokens": 200}  # minigpt generate's defaults


def check_out(out: Path, fmt: str) -> None:
    """Refuse, before any work, an ``out`` that exists or cannot be written."""
    if fmt not in FORMATS:
        raise ConvertError(f"format {fmt} is unknown", f"use {' or '.join(FORMATS)}",
                           setting="format")
    if out.exists() or out.is_symlink():
        raise ConvertError(f"out {out} already exists", "choose a new path",
                           setting="out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write {out}: {parent} is not a writable directory",
                           "choose a writable path")


def export(run: LoadedRun, out: Path, fmt: str, dtype: str = "f32") -> Path:
    """Write ``run`` to ``out`` in format ``fmt`` (``hf`` or ``gguf``)."""
    check_out(out, fmt)
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
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(DIR_MODE)
        save_hf_tokenizer(run.tokenizer, tmp, model_max_length=cfg.max_seq_length,
                          chat_template=_chat_template(run))
        weights = hf.to_gpt2_state_dict(run.model)
        save_file(weights, str(tmp / hf.WEIGHTS_FILE), metadata={"format": "pt"})
        config = hf.gpt2_config(cfg, run.tokenizer.eot_id)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(run))
        atomic_write_text(tmp / "README.md", model_card(run, out.name))
        for path in tmp.iterdir():
            path.chmod(FILE_MODE)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_gguf(run: LoadedRun, out: Path, dtype: str) -> Path:
    from minigpt_cli.convert.gguf import export_gguf

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
                              **GENERATION_DEFAULTS}
    extra = range(run.tokenizer.vocab_size, run.config.model.vocab_size)
    if len(extra):  # padding rows of the embedding: minigpt never samples them either
        config["suppress_tokens"] = list(extra)
    return config


def model_card(run: LoadedRun, name: str) -> str:
    """A README.md for the exported folder: where the model comes from and how to load it."""
    cfg, state = run.config, run.state
    m = cfg.model
    best = state.get("best_val_loss")
    rows = [
        ("trained with", f"minigpt {__version__}"),
        ("data", cfg.data.dataset),
        ("tokenizer", f"{run.tokenizer.spec} ({run.tokenizer.vocab_size:,} tokens)"),
        ("architecture", f"GPT-2: {m.num_layers} layers, {m.embed_dim} wide, {m.num_heads} "
                         f"heads, feed-forward {m.ff_dim}, context {m.max_seq_length}"
                         + ("" if m.bias else ", no biases (exported as zeros)")),
        ("parameters", f"{run.model.num_params():,}"),
        ("steps", f"{state.get('step', 0):,}"),
        ("validation loss", "—" if best is None else f"{best:.4f} nats/token"),
    ]
    bpb = _bits_per_byte(run)
    if bpb is not None:
        rows.append(("bits per byte", f"{bpb:.4f} (minigpt eval, {cfg.data.dataset} val)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
tags: [minigpt, gpt2, text-generation]
---

# {name}

A GPT-2-style language model trained from scratch with minigpt.

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

`generation_config.json` holds minigpt's sampling defaults (temperature 0.8); pass
`do_sample=False` for greedy decoding.
"""


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

"""``minigpt import`` and ``minigpt train --init``: weights and a tokenizer from elsewhere.

A source is a Hugging Face GPT-2-family folder, ``hf:NAME`` (downloaded from the Hub
through ``huggingface_hub``, or taken from its local cache), or another minigpt run. A
source tuned with one of minigpt's chat templates (a run, or its export) brings it along.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.convert import hf, llama
from minigpt_cli.errors import ConvertError
from minigpt_cli.fileio import DIR_MODE
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import layout
from minigpt_cli.run.checkpoint import save_checkpoint

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt", "special_tokens_map.json", "generation_config.json"]
SOURCE_HINT = "pass a Hugging Face GPT-2 or Llama folder, hf:NAME or a minigpt run directory"


@dataclass
class Source:
    """A model to start from: its shape, its weights (minigpt's names) and its tokenizer."""

    name: str
    model: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    path: Path | None = None  # the local run directory or folder it was read from
    base: dict | None = None  # for LoRA: the base's sha256 (and vocab_size) before new rows
    template: str | None = None  # the name of the minigpt chat template it was tuned with

    def build(self, cfg: ModelConfig | None = None) -> GPT:
        """The model with these weights (``cfg`` may differ in dropout only)."""
        model = GPT(cfg or self.model)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        return model


def resolve(source: str) -> Source:
    """The model ``source`` names (see the module docstring)."""
    spec = source.strip()
    if not spec:
        raise ConvertError("no source given", SOURCE_HINT)
    if spec.startswith("hf:"):
        name = spec[3:].strip()
        if not name:
            raise ConvertError(f"'{spec}' names no model", "write hf:OWNER/NAME")
        return _from_folder(download(name), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConvertError(f"source {spec} does not exist", SOURCE_HINT, setting="source")
    if not path.is_dir():
        raise ConvertError(f"source {spec} is a file, not a model folder", SOURCE_HINT,
                           setting="source")
    if layout.is_run_dir(path):
        return _from_run(path)
    return _from_folder(path, spec)


def _from_run(path: Path) -> Source:
    from minigpt_cli.chat.template import saved_template_name
    from minigpt_cli.run.load import load_run

    run = load_run(path)
    state = {k: v.detach().clone() for k, v in run.model.state_dict().items()
             if k != "lm_head.weight" or not run.model.tied}
    return Source(str(path), run.config.model, state, run.tokenizer, path.resolve(),
                  template=saved_template_name(path))


def _from_folder(folder: Path, name: str) -> Source:
    from minigpt_cli.chat.template import TEMPLATES
    from minigpt_cli.convert.hf_tokenizer import folder_chat_template, load_hf_tokenizer

    reader = llama if hf.read_config(folder).get("model_type") == "llama" else hf
    checkpoint = reader.read_checkpoint(folder, name)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer.vocab_size > checkpoint.model.vocab_size:
        raise ConvertError(f"{name}: the tokenizer has {tokenizer.vocab_size:,} tokens, more "
                           f"than the model's embedding ({checkpoint.model.vocab_size:,})",
                           "the tokenizer files do not belong to these weights")
    jinja = folder_chat_template(folder)  # one of minigpt's templates, as its export writes
    template = next((t.name for t in TEMPLATES.values() if jinja == t.chat_template
                     and set(t.special_tokens) <= set(tokenizer.added_tokens)), None)
    return Source(name, checkpoint.model, checkpoint.state_dict, tokenizer, folder.resolve(),
                  template=template)


def download(name: str) -> Path:
    """A Hub model's files (config, weights, tokenizer) in the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ConvertError("the 'huggingface_hub' package is needed for hf: sources",
                           "pip install huggingface_hub, or pass a local folder") from e
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated model: all one line
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"cannot get {name} from the Hugging Face Hub: {text}",
                           "check the name and the network, or pass a local folder") from e


def import_run(source: str, out: Path) -> Path:
    """A new run directory ``out`` holding ``source``'s model and tokenizer, ready for
    generate, chat, eval, inspect and export. Nothing is left behind on failure."""
    from minigpt_cli.chat.template import TEMPLATES, save_run_template

    layout.check_new_run_dir(out)
    src = resolve(source)
    config = Config()
    config.model = src.model
    config.tokenizer.spec = src.tokenizer.spec
    config.description = f"imported from {src.name}"
    config.validate()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(DIR_MODE)
        layout.write_run_files(tmp, config, src.tokenizer)
        if src.template is not None:  # chat, generate --chat and export use it untold
            save_run_template(tmp, TEMPLATES[src.template])
        save_checkpoint(tmp, 0, src.build(), state={"best_val_loss": None,
                                                    "imported_from": src.name},
                        training_tensors={}, best=True)
        layout.check_new_run_dir(out)  # still free
        if out.is_dir():
            out.rmdir()  # an empty folder the user made for it
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

"""GGUF export of Llama-style models (architecture ``llama``): read back by transformers'
GGUF loader (which undoes llama.cpp's q/k layout) with the same logits, and, with
llama-cpp-python installed (``-m slow``), run by llama.cpp with the same top-1 everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.config import ModelConfig
from minigpt_cli.convert.gguf import export_gguf
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and "
        "Juliet is the sun.\n")


def llama_toy(kv_heads: int = 2, tied: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257 + 7, max_seq_length=64, embed_dim=64, num_heads=4,
                      num_layers=2, ff_dim=None, dropout=0.0, bias=False, position="rope",
                      norm="rmsnorm", mlp="swiglu", num_kv_heads=kv_heads,
                      tie_embeddings=tied, rope_theta=1000.0)
    cfg.validate()
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.transformer.wte.weight.mul_(20)
        if not tied:
            model.lm_head.weight.mul_(20)
    return model


def ids_of(text: str) -> list[int]:
    return minigpt_tokenizers.create("byte").encode(text)


@pytest.mark.parametrize("kv_heads, tied", [(2, True), (1, False)])
def test_transformers_reads_the_llama_gguf_with_the_same_logits(tmp_path, kv_heads, tied):
    transformers = pytest.importorskip("transformers")
    model = llama_toy(kv_heads, tied)
    export_gguf(model, minigpt_tokenizers.create("byte"), tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_gate.weight"} <= names
    assert ("output.weight" in names) is not tied and "position_embd.weight" not in names

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert hf.config.num_key_value_heads == kv_heads
    ids = ids_of(TEXT)[:64]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
        theirs = hf(torch.tensor([ids])).logits[0]
    assert ours.std() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)


def test_llama_with_biases_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=257, max_seq_length=16, embed_dim=32, num_heads=2,
                      num_layers=1, ff_dim=64, dropout=0.0, bias=True, position="rope",
                      norm="rmsnorm", mlp="swiglu")
    with pytest.raises(ConvertError, match="^model.bias true"):
        export_gguf(GPT(cfg), minigpt_tokenizers.create("byte"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("kv_heads, tied", [(2, True), (1, False)])
def test_llama_cpp_runs_the_llama_export(tmp_path, dtype, kv_heads, tied, llama_cpp_logits):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"no text at {SHAKESPEARE}")
    model = llama_toy(kv_heads, tied, seed=1)
    ids = ids_of(SHAKESPEARE.read_text(encoding="utf-8")[:64])
    path = tmp_path / f"llama-{dtype}.gguf"
    export_gguf(model, minigpt_tokenizers.create("byte"), path, dtype)
    got, want = llama_cpp_logits(path, model, ids)
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"\nllama.cpp llama {dtype} kv {kv_heads}: max |logit diff| {diff:.4g} of logits up "
          f"to {scale:.3g} ({diff / scale:.2g})")
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert diff <= (1e-3 if dtype == "f32" else 5e-3) * scale

"""A LoRA run exported for Hugging Face: merged into the weights, or as a PEFT adapter that
``peft.PeftModel.from_pretrained`` loads onto the base; both compute minigpt's logits
within 1e-4. Checked against transformers and PEFT themselves, for a base that is a
minigpt run and for a base that is a transformers GPT-2 folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.convert.export import export
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import layout
from minigpt_cli.run.checkpoint import save_checkpoint
from minigpt_cli.run.load import load_run
from minigpt_cli.train.setup import prepare

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
               for i in range(200))
TRAIN = ["train.max_steps=8", "train.batch_size=4", "train.warmup_steps=0",
         "train.learning_rate=1e-2", "train.eval_iters=1", "train.eval_interval=8",
         "train.device=cpu", "train.precision=fp32", "lora.rank=4", "lora.alpha=8"]


def base_run(run_dir: Path, bias: bool) -> Path:
    """A toy base run with biases and norms away from their initial values."""
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=2,
                      num_layers=2, ff_dim=64, dropout=0.0, bias=bias)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = Config()
    config.model = cfg
    layout.create_run_dir(run_dir)
    layout.write_run_files(run_dir, config, minigpt_tokenizers.create("byte"))
    save_checkpoint(run_dir, 1, model, state={"best_val_loss": None}, training_tensors={},
                    best=True)
    return run_dir


def lora_run(tmp_path: Path, init: Path, *extra: str) -> Path:
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    cfg = Config.from_sources("tiny", overrides=[f"data.dataset={corpus}",
                                                 f"train.init={init}", *TRAIN, *extra])
    prepare(cfg, tmp_path / "lora").trainer.fit()
    return tmp_path / "lora"


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0]


@pytest.mark.parametrize("bias", [True, False])
def test_peft_loads_the_adapter_of_a_run_onto_its_base(bias, tmp_path):
    base = base_run(tmp_path / "base", bias)
    run = load_run(lora_run(tmp_path, base, "lora.dropout=0.1"))
    export(load_run(base), tmp_path / "base-hf", "hf")
    export(run, tmp_path / "adapter", "hf", adapter_only=True)
    export(run, tmp_path / "merged", "hf")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["fan_in_fan_out"]
    assert config["base_model_name_or_path"] is None  # a minigpt run: no HF name
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base-hf").eval()
    model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    names = {n for n, _ in model.named_parameters() if "lora_B" in n}
    assert len(names) == 8  # every projection of both blocks carries its adapter
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    ids = run.tokenizer.encode(TEXT[:30])
    expected = logits_of(run.model, ids)
    torch.testing.assert_close(logits_of(model, ids), expected, atol=1e-4, rtol=0)
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(merged, ids), expected, atol=1e-4, rtol=0)
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base-hf").eval()
    assert not torch.allclose(logits_of(hf_base, ids), expected, atol=1e-3)  # PEFT's own


def test_peft_loads_the_adapter_of_a_transformers_gpt2(tmp_path):
    """A base made and saved by transformers, fine-tuned with --init FOLDER --lora."""
    from minigpt_cli.convert.hf_tokenizer import save_hf_tokenizer

    torch.manual_seed(3)
    gpt2 = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, bos_token_id=256, eos_token_id=256)
    hf_base = transformers.GPT2LMHeadModel(gpt2).eval()
    with torch.no_grad():
        for p in hf_base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "gpt2"
    hf_base.save_pretrained(folder)
    save_hf_tokenizer(minigpt_tokenizers.create("byte"), folder, model_max_length=64)

    run = load_run(lora_run(tmp_path, folder, "lora.targets=c_attn, mlp.c_proj"))
    export(run, tmp_path / "adapter", "hf", adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.resolve())
    assert len(config["target_modules"]) == 4
    model = peft.PeftModel.from_pretrained(  # wraps the model it is given, in place
        transformers.GPT2LMHeadModel.from_pretrained(folder).eval(), tmp_path / "adapter")
    ids = run.tokenizer.encode(TEXT[:40])
    torch.testing.assert_close(logits_of(model.eval(), ids), logits_of(run.model, ids),
                               atol=1e-4, rtol=0)
    assert not torch.allclose(logits_of(hf_base, ids), logits_of(run.model, ids), atol=1e-3)


def test_adapter_only_needs_a_lora_run_and_the_hf_format(tmp_path):
    base = base_run(tmp_path / "base", True)
    with pytest.raises(ConvertError, match="^adapter_only: .* is not a LoRA run"):
        export(load_run(base), tmp_path / "x", "hf", adapter_only=True)
    with pytest.raises(ConvertError, match="^adapter_only writes a PEFT adapter folder"):
        export(load_run(base), tmp_path / "x", "gguf", adapter_only=True)
    assert not (tmp_path / "x").exists()


def test_peft_loads_the_adapter_of_a_llama_style_run(tmp_path):
    """A rope/rmsnorm/swiglu run with grouped-query attention: its fused c_attn adapter
    goes to PEFT as q_proj, k_proj and v_proj adapters on the Llama export, gate_proj too."""
    torch.manual_seed(6)
    cfg = ModelConfig(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=4,
                      num_kv_heads=2, num_layers=2, ff_dim=48, dropout=0.0, bias=False,
                      position="rope", norm="rmsnorm", mlp="swiglu")
    config = Config()
    config.model = cfg
    base = tmp_path / "base"
    layout.create_run_dir(base)
    layout.write_run_files(base, config, minigpt_tokenizers.create("byte"))
    save_checkpoint(base, 1, GPT(cfg), state={"best_val_loss": None}, training_tensors={},
                    best=True)
    run = load_run(lora_run(tmp_path, base))
    export(load_run(base), tmp_path / "base-hf", "hf")
    export(run, tmp_path / "adapter", "hf", adapter_only=True)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not config["fan_in_fan_out"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert len({n for n, _ in model.named_parameters() if "lora_B" in n}) == 14
    ids = run.tokenizer.encode(TEXT[:30])
    expected = logits_of(run.model, ids)
    torch.testing.assert_close(logits_of(model, ids), expected, atol=1e-4, rtol=0)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    assert not torch.allclose(logits_of(plain, ids), expected, atol=1e-3)

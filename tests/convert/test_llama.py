"""Llama-style runs (rope, rmsnorm, swiglu, grouped-query attention) exported to Hugging
Face ``LlamaForCausalLM`` and imported back, checked against transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.convert import llama
from minigpt_cli.convert.export import export
from minigpt_cli.convert.importing import import_run, resolve
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import layout
from minigpt_cli.run.checkpoint import save_checkpoint
from minigpt_cli.run.load import load_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and "
        "Juliet is the sun. Arise, fair sun, and kill the envious moon.\n")
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def toy(**overrides) -> ModelConfig:
    cfg = ModelConfig(**{**dict(vocab_size=257, max_seq_length=96, embed_dim=32, num_heads=4,
                                num_layers=2, ff_dim=None, dropout=0.0), **LLAMA, **overrides})
    cfg.validate()
    return cfg


def make_run(run_dir: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A byte-level run whose model has far-from-flat logits and norm gains away from one."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        model.transformer.wte.weight.mul_(20)
        if not model.tied:
            model.lm_head.weight.mul_(20)
    config = Config()
    config.model = cfg
    config.tokenizer.spec = "byte"
    layout.create_run_dir(run_dir)
    layout.write_run_files(run_dir, config, minigpt_tokenizers.create("byte"))
    save_checkpoint(run_dir, 3, model, state={"best_val_loss": 2.0}, training_tensors={},
                    best=True)
    return run_dir


def logits_of(model, ids: list[int], hf: bool = False) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
        return (out.logits if hf else out[0])[0]


@pytest.mark.parametrize("overrides", [
    dict(num_kv_heads=2),
    dict(num_kv_heads=1, tie_embeddings=False, rope_theta=500.0),
    dict(bias=True, norm_eps=1e-6),
])
def test_llama_export_loads_in_transformers_with_the_same_logits(overrides, tmp_path):
    cfg = toy(**overrides)
    run = load_run(make_run(tmp_path / "run", cfg))
    out = export(run, tmp_path / "hf", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == cfg.kv_heads
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied is cfg.tie_embeddings
    ids = run.tokenizer.encode(TEXT)[:96]
    ours, theirs = logits_of(run.model, ids), logits_of(model, ids, hf=True)
    assert ours.std() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert "Llama" in (out / "README.md").read_text()

    back = load_run(import_run(str(out), tmp_path / "back"))
    assert back.config.model == run.config.model
    a, b = run.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def random_llama(folder: Path, **config) -> Path:
    """A small Llama made with transformers (random weights, saved with save_pretrained),
    with the byte tokenizer's files."""
    from minigpt_cli.convert.hf_tokenizer import save_hf_tokenizer

    torch.manual_seed(5)
    hf_cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, **config)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    save_hf_tokenizer(minigpt_tokenizers.create("byte"), folder, model_max_length=64)
    return folder


def test_import_a_transformers_llama_with_the_same_logits(tmp_path):
    folder = random_llama(tmp_path / "llama", tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    run = load_run(import_run(str(folder), tmp_path / "run"))
    m = run.config.model
    assert (m.position, m.norm, m.mlp, m.kv_heads, m.ff_dim, m.norm_eps, m.tie_embeddings) == (
        "rope", "rmsnorm", "swiglu", 2, 80, 1e-6, False)
    ids = run.tokenizer.encode(TEXT)[:64]
    torch.testing.assert_close(logits_of(run.model, ids), logits_of(model, ids, hf=True),
                               atol=1e-4, rtol=0)


def test_train_init_from_a_llama(tmp_path, cache_dir):
    from minigpt_cli.train.setup import prepare

    folder = random_llama(tmp_path / "llama")
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 30)
    cfg = Config.from_sources("tiny", overrides=[f"data.dataset={corpus}", f"train.init={folder}",
                                                 "train.max_steps=2", "train.batch_size=2",
                                                 "train.device=cpu", "train.eval_iters=1",
                                                 "model.max_seq_length=32"])
    run = prepare(cfg, tmp_path / "run", changed={"data.dataset", "train.init",
                                                  "model.max_seq_length"})
    assert run.config.model.position == "rope" and run.config.model.max_seq_length == 32
    start = resolve(str(folder))
    torch.testing.assert_close(run.trainer.model.transformer.h[1].mlp.c_gate.weight,
                               start.state_dict["transformer.h.1.mlp.c_gate.weight"])
    run.trainer.fit()


@pytest.mark.parametrize("overrides, says", [
    (dict(position="rope", norm="layernorm", mlp="gelu", bias=True),
     "model.position rope cannot be exported as GPT-2, which needs model.position learned; "
     "Llama needs model.norm rmsnorm, model.mlp swiglu"),
    (dict(LLAMA, qk_norm=True), "model.qk_norm has no Hugging Face"),
    (dict(num_kv_heads=1), "model.num_kv_heads 1 cannot be exported as GPT-2, which needs "
                           "model.num_kv_heads null (all 4 heads); Llama needs model.position "
                           "rope"),
    (dict(position="rope", norm="rmsnorm", mlp="gelu", num_kv_heads=2),
     "model.mlp gelu cannot be exported as Llama, which needs model.mlp swiglu; GPT-2 needs "
     "model.position learned, model.norm layernorm, model.num_kv_heads null"),
])
def test_a_mix_neither_format_has_is_one_line_and_writes_nothing(overrides, says, tmp_path, cli):
    cfg = ModelConfig(vocab_size=257, max_seq_length=16, embed_dim=32, num_heads=4,
                      num_layers=1, ff_dim=64, dropout=0.0, **overrides)
    cfg.validate()
    run_dir = make_run(tmp_path / "run", cfg)
    for fmt in ("hf", "gguf"):
        result = cli.invoke("export", "--model", run_dir, "--format", fmt,
                            "--out", tmp_path / "out")
        cli.assert_one_line_error(result, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ConvertError):
        llama.family(cfg)


def test_rope_scaling_is_refused_on_import(tmp_path):
    folder = random_llama(tmp_path / "llama")
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConvertError, match="rope scaling 'llama3'"):
        resolve(str(folder))


@pytest.mark.parametrize("key, value", [
    ("rms_norm_eps", None), ("rms_norm_eps", "1e-5"), ("rope_theta", "10000"),
    ("rope_parameters", [10000.0]), ("attention_dropout", "0.1"), ("rms_norm_eps", float("nan")),
])
def test_a_malformed_llama_config_is_a_convert_error(key, value):
    raw = llama.llama_config(toy(), eot_id=256, tied=True)
    if key == "rope_theta":
        del raw["rope_parameters"]
    raw[key] = value
    with pytest.raises(ConvertError, match=key):
        llama.model_config(raw, "folder")

"""Export to Hugging Face transformers and import back, checked against transformers itself:
logits within 1e-4 (fp32) and the same greedy tokens, for toy models of every preset's
shape and for every built-in tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import minigpt_tokenizers
from minigpt_cli.cli.app import app
from minigpt_cli.config import Config, ModelConfig, preset_names
from minigpt_cli.convert import hf
from minigpt_cli.convert.export import export
from minigpt_cli.convert.importing import import_run, resolve
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine, GenerationResult
from minigpt_cli.model.gpt import GPT
from minigpt_cli.run import layout
from minigpt_cli.run.checkpoint import save_checkpoint
from minigpt_cli.run.load import load_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
TEXT = ("The quick brown fox jumps over the lazy dog. ROMEO: But soft, what light through "
        "yonder window breaks? It is the east, and Juliet is the sun. Arise, fair sun!\n")


def toy_shape(preset: str, vocab_size: int) -> ModelConfig:
    """A small model with the preset's choices: bias, feed-forward ratio, heads."""
    base = Config.from_preset(preset).model
    heads = min(base.num_heads, 4)
    return ModelConfig(vocab_size=vocab_size, max_seq_length=96, embed_dim=8 * heads,
                       num_heads=heads, num_layers=2,
                       ff_dim=8 * heads * base.ff_dim // base.embed_dim, dropout=0.0,
                       bias=base.bias)


def make_run(run_dir: Path, cfg: ModelConfig, tokenizer, seed: int = 0) -> Path:
    """A run directory with a model whose logits are far from flat (so greedy decoding
    and the comparison mean something)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or (".ln_" in name and name.endswith("weight")):
                p.add_(torch.randn_like(p) * 0.1)
        model.transformer.wte.weight.mul_(20)
    config = Config()
    config.model = cfg
    config.tokenizer.spec = tokenizer.spec
    layout.create_run_dir(run_dir)
    layout.write_run_files(run_dir, config, tokenizer)
    save_checkpoint(run_dir, 7, model, state={"best_val_loss": 2.5}, training_tensors={},
                    best=True)
    return run_dir


def tokenizer_for(name: str):
    if name == "byte":
        return minigpt_tokenizers.create("byte")
    if name == "char":
        return minigpt_tokenizers.create("char", lambda: [TEXT * 3])
    if name == "tiktoken":
        if not GPT2_RANKS.is_file():
            pytest.skip(f"{GPT2_RANKS} not available")
        return minigpt_tokenizers.create(f"tiktoken:{GPT2_RANKS}")
    if name == "sentencepiece":
        return minigpt_tokenizers.create("sentencepiece:bpe:400", lambda: [TEXT * 40])
    raise AssertionError(name)


def minigpt_logits(run, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return run.model(torch.tensor([ids]))[0][0]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("preset", preset_names())
def test_weights_load_in_transformers_with_the_same_logits(preset, tmp_path):
    """Per preset shape, bias and no bias: GPT2LMHeadModel computes minigpt's logits."""
    cfg = toy_shape(preset, vocab_size=257)
    run = load_run(make_run(tmp_path / "run", cfg, minigpt_tokenizers.create("byte")))
    out = tmp_path / "hf"
    export(run, out, "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    ids = run.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    ours, theirs = minigpt_logits(run, ids), hf_logits(model, ids)
    assert ours.std() > 1.0  # a model with something to say
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"],
            config["n_inner"]) == (cfg.embed_dim, 2, cfg.num_heads, 96, cfg.ff_dim)
    assert config["minigpt"]["bias"] is cfg.bias
    if not cfg.bias:
        assert all(not model.state_dict()[k].any() for k in model.state_dict()
                   if k.endswith(".bias") and "ln_" in k or k.endswith("c_fc.bias"))


@pytest.mark.parametrize("tok_name", ["byte", "char", "tiktoken", "sentencepiece"])
def test_exported_tokenizer_and_greedy_generation_match(tok_name, tmp_path):
    tok = tokenizer_for(tok_name)
    cfg = toy_shape("small", vocab_size=tok.vocab_size)
    run = load_run(make_run(tmp_path / "run", cfg, tok, seed=1))
    out = export(run, tmp_path / "hf", "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_tok(TEXT, add_special_tokens=False).input_ids == tok.encode(TEXT)
    ids = tok.encode(TEXT)[:24]
    torch.testing.assert_close(hf_logits(model, ids), minigpt_logits(run, ids), atol=1e-4,
                               rtol=0)
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                   min_new_tokens=40, pad_token_id=tok.eot_id)[0, len(ids):]
    *_, result = Engine(run.model, tok).generate(ids, SamplingSettings(
        max_new_tokens=40, temperature=0))
    assert isinstance(result, GenerationResult)
    ours = result.samples[0].tokens
    assert generated.tolist()[:len(ours)] == ours
    assert len(ours) == 40 or result.samples[0].finish_reason == "eot"


def test_export_folder_has_a_model_card_and_generation_config(tmp_path):
    cfg = toy_shape("tiny", vocab_size=300)  # an embedding larger than the vocabulary
    run = load_run(make_run(tmp_path / "run", cfg, minigpt_tokenizers.create("byte")))
    out = export(run, tmp_path / "hf", "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "tokenizer.json"} <= names
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256 and gen["suppress_tokens"] == list(range(257, 300))
    card = (out / "README.md").read_text()
    assert "from_pretrained" in card and "2.5000" in card and "7" in card
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_round_trips_are_bit_identical(tmp_path):
    """import(export(run)) has the run's tensors; export(import(X)) has X's."""
    for bias in (True, False):
        cfg = toy_shape("tiny", vocab_size=257)
        cfg.bias = bias
        run = load_run(make_run(tmp_path / f"run{bias}", cfg, minigpt_tokenizers.create("byte")))
        out = export(run, tmp_path / f"hf{bias}", "hf")
        back = load_run(import_run(str(out), tmp_path / f"back{bias}"))
        assert back.config.model == run.config.model
        a, b = run.model.state_dict(), back.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert back.tokenizer.encode(TEXT) == run.tokenizer.encode(TEXT)
        again = export(back, tmp_path / f"again{bias}", "hf")
        x, y = hf.read_weights(out), hf.read_weights(again)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("design", [{}, dict(position="rope", norm="rmsnorm", mlp="swiglu",
                                              bias=False)], ids=["gpt2", "llama"])
def test_generation_config_keeps_transformers_generate_inside_the_context(design, tmp_path):
    """Without arguments, transformers' generate() stops at the context (GPT-2's learned
    positions end there: 200 new tokens past it were an IndexError)."""
    cfg = ModelConfig(vocab_size=257, max_seq_length=24, embed_dim=32, num_heads=4,
                      num_layers=1, ff_dim=64, dropout=0.0, **design)
    run = load_run(make_run(tmp_path / "run", cfg, minigpt_tokenizers.create("byte")))
    out = export(run, tmp_path / "hf", "hf")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_length"] == 24 and "max_new_tokens" not in gen
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        ids = model.generate(**tok("The", return_tensors="pt"), min_new_tokens=21)
    assert ids.shape == (1, 24)


def test_export_creates_missing_folders_above_out(tmp_path, monkeypatch):
    """As import and train do; a failed export removes the folders it made."""
    monkeypatch.chdir(tmp_path)
    run_dir = make_run(tmp_path / "run", toy_shape("tiny", 257), minigpt_tokenizers.create("byte"))
    result = runner.invoke(app, ["export", "--model", str(run_dir), "--out", "exported/tiny"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "tiny" / "config.json").is_file()
    run = load_run(run_dir)
    assert export(run, Path("exported2/sub/tiny.gguf"), "gguf").is_file()
    char = load_run(make_run(tmp_path / "char", toy_shape("tiny", 60), tokenizer_for("char")))
    with pytest.raises(Exception, match="char"):  # GGUF takes byte and BPE tokenizers only
        export(char, Path("exported3/sub/char.gguf"), "gguf")
    assert not (tmp_path / "exported3").exists()


def test_an_untied_gpt2_with_its_own_norm_eps_exports_and_imports(tmp_path):
    """model.tie_embeddings false and model.norm_eps are GPT-2's tie_word_embeddings and
    layer_norm_epsilon, both ways."""
    cfg = toy_shape("tiny", vocab_size=257)
    cfg.tie_embeddings, cfg.norm_eps = False, 1e-2
    run = load_run(make_run(tmp_path / "run", cfg, minigpt_tokenizers.create("byte")))
    with torch.no_grad():
        run.model.lm_head.weight.normal_(0, 2)
    out = export(run, tmp_path / "hf", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.layer_norm_epsilon == 1e-2 and not model.config.tie_word_embeddings
    ids = run.tokenizer.encode(TEXT)[:64]
    torch.testing.assert_close(hf_logits(model, ids), minigpt_logits(run, ids), atol=1e-4,
                               rtol=0)
    back = load_run(import_run(str(out), tmp_path / "back"))
    assert back.config.model == run.config.model and not back.model.tied
    torch.testing.assert_close(minigpt_logits(back, ids), hf_logits(model, ids), atol=1e-4,
                               rtol=0)


def test_import_a_transformers_gpt2_with_an_untied_head_and_another_eps(tmp_path):
    folder = random_gpt2(tmp_path / "gpt2", layer_norm_epsilon=1e-3, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    run = load_run(import_run(str(folder), tmp_path / "run"))
    assert run.config.model.norm_eps == 1e-3 and not run.config.model.tie_embeddings
    ids = run.tokenizer.encode(TEXT)[:48]
    torch.testing.assert_close(minigpt_logits(run, ids), hf_logits(model, ids), atol=1e-4,
                               rtol=0)


def test_the_model_card_says_where_the_model_comes_from(tmp_path, cache_dir):
    """Trained from scratch, imported (no data, no steps) or fine-tuned from a base."""
    from minigpt_cli.train.setup import prepare

    base = make_run(tmp_path / "base", toy_shape("tiny", 257), minigpt_tokenizers.create("byte"))
    card = (export(load_run(base), tmp_path / "hf", "hf") / "README.md").read_text()
    assert "trained from scratch with minigpt" in card and "| steps | 7 |" in card
    imported = import_run(str(tmp_path / "hf"), tmp_path / "imported")
    card = (export(load_run(imported), tmp_path / "hf2", "hf") / "README.md").read_text()
    assert f"imported into minigpt from {tmp_path / 'hf'}." in card
    assert "from scratch" not in card and "| data |" not in card and "| steps |" not in card
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 30)
    cfg = init_config(corpus, imported, steps=1)
    prepare(cfg, tmp_path / "tuned", changed={"data.dataset", "train.init"}).trainer.fit()
    card = (export(load_run(tmp_path / "tuned"), tmp_path / "hf3", "hf") / "README.md").read_text()
    assert f"fine-tuned with minigpt from {imported}." in card and "from scratch" not in card
    assert f"| base model | {imported} |" in card and f"| data | {corpus} |" in card


def random_gpt2(folder: Path, n_inner: int | None = None, **config) -> Path:
    """A small GPT-2 made with transformers (random weights), saved with save_pretrained,
    with GPT-2's own tokenizer files (from the shared ranks)."""
    if not GPT2_RANKS.is_file():
        pytest.skip(f"{GPT2_RANKS} not available")
    from minigpt_cli.convert.hf_tokenizer import save_hf_tokenizer

    torch.manual_seed(3)
    gpt2 = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, n_inner=n_inner, **config)
    model = transformers.GPT2LMHeadModel(gpt2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    save_hf_tokenizer(minigpt_tokenizers.create(f"tiktoken:{GPT2_RANKS}"), folder,
                      model_max_length=64)
    return folder


def test_import_a_transformers_gpt2_with_the_same_logits_and_greedy_text(tmp_path):
    folder = random_gpt2(tmp_path / "gpt2", n_inner=96)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    run = load_run(import_run(str(folder), tmp_path / "run"))
    assert run.config.model.ff_dim == 96 and run.config.model.bias
    ids = run.tokenizer.encode(TEXT)[:48]
    torch.testing.assert_close(minigpt_logits(run, ids), hf_logits(model, ids), atol=1e-4,
                               rtol=0)
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   min_new_tokens=16, pad_token_id=50256)[0, len(ids):]
    *_, result = Engine(run.model, run.tokenizer).generate(
        ids, SamplingSettings(max_new_tokens=16, temperature=0))
    assert generated.tolist()[:len(result.samples[0].tokens)] == result.samples[0].tokens


def test_import_reads_pytorch_model_bin_without_unpickling_objects(tmp_path):
    folder = random_gpt2(tmp_path / "gpt2")
    weights = hf.read_weights(folder)
    (folder / hf.WEIGHTS_FILE).unlink()
    torch.save(weights, folder / hf.PICKLE_WEIGHTS)
    src = resolve(str(folder))
    assert src.model.ff_dim == 128
    (folder / hf.PICKLE_WEIGHTS).write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(Exception, match="unreadable"):
        resolve(str(folder))


def init_config(corpus, init, steps: int) -> Config:
    """The tiny preset on ``corpus``, started from ``init``, for ``steps`` quick steps."""
    return Config.from_sources("tiny", overrides=[
        f"data.dataset={corpus}", f"train.init={init}", f"train.max_steps={steps}",
        "train.batch_size=2", "train.device=cpu", "train.eval_iters=1"])


def test_train_init_starts_from_the_weights_and_keeps_the_tokenizer(tmp_path, cache_dir):
    folder = random_gpt2(tmp_path / "gpt2")
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 30)
    from minigpt_cli.train.setup import prepare

    cfg = init_config(corpus, folder, steps=2)
    run = prepare(cfg, tmp_path / "run", changed={"data.dataset", "train.init"})
    assert run.config.model.embed_dim == 32 and run.config.model.vocab_size == 50257
    start = resolve(str(folder))
    torch.testing.assert_close(run.trainer.model.transformer.h[1].mlp.c_fc.weight,
                               start.state_dict["transformer.h.1.mlp.c_fc.weight"])
    run.trainer.fit()
    assert load_run(tmp_path / "run").tokenizer.encode(TEXT) == start.tokenizer.encode(TEXT)
    with pytest.raises(Exception, match="model.num_layers comes from"):
        prepare(Config.from_sources("tiny", overrides=[f"data.dataset={corpus}",
                                                       f"train.init={folder}",
                                                       "model.num_layers=3"]),
                tmp_path / "run2", changed={"train.init", "model.num_layers"})


runner = CliRunner()


@pytest.mark.parametrize("args, says", [
    (["export", "--model", "RUN", "--format", "onnx", "--out", "x"], "--format onnx is unknown"),
    (["export", "--model", "RUN", "--out", "EXISTS"], "--out"),
    (["export", "--model", "nowhere", "--out", "x"], "--model nowhere does not exist"),
    (["export", "--model", "RUN", "--out", "x", "--dtype", "f16"], "applies to gguf"),
    (["export", "--model", "RUN", "--out", "RUN/config.yaml/x"],
     "cannot write RUN/config.yaml/x: RUN/config.yaml is a file, not a folder"),
    (["export", "--model", "RUN", "--format", "gguf", "--out", "RUN/config.yaml/a/x.gguf"],
     "RUN/config.yaml is a file, not a folder"),
    (["import", "nowhere", "--out", "new"], "does not exist"),
    (["import", "RUN/config.yaml", "--out", "new"], "is a file"),
    (["import", "NOTGPT2", "--out", "new"], "is a bert model"),
    (["import", "NOKEY", "--out", "new"], "config.json has no 'n_layer'"),
    (["import", "RUN", "--out", "EXISTS"], "already exists"),
    (["import", "EMPTY", "--out", "new"], "has no config.json"),
])
def test_bad_input_is_one_line_and_leaves_nothing(args, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "RUN", toy_shape("tiny", 257), minigpt_tokenizers.create("byte"))
    (tmp_path / "EXISTS").mkdir()
    (tmp_path / "EXISTS" / "f").write_text("x")
    (tmp_path / "EMPTY").mkdir()
    bert = {"model_type": "bert", "architectures": ["BertForMaskedLM"]}
    for name, config in (("NOTGPT2", bert),
                         ("NOKEY", {"model_type": "gpt2", "n_embd": 32, "n_head": 2,
                                    "n_positions": 8, "vocab_size": 9})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:") and says in err, err
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_hf_sources_download_through_the_hub_client(tmp_path, monkeypatch):
    """hf:NAME asks huggingface_hub for the model's files (no network here: the client is
    stood in for); a failure is one line."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = random_gpt2(tmp_path / "gpt2")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        if repo_id != "someone/gpt2":
            raise OSError("404 Client Error: Repository Not Found\nmore")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    src = resolve("hf:someone/gpt2")
    assert src.name == "hf:someone/gpt2" and src.model.embed_dim == 32
    assert asked[0][0] == "someone/gpt2" and "config.json" in asked[0][1]
    with pytest.raises(Exception, match="cannot get nobody/x from the Hugging Face Hub: 404"):
        resolve("hf:nobody/x")


@pytest.mark.parametrize("value", ["0.1", [0.1], float("inf")])
def test_a_malformed_gpt2_dropout_is_a_convert_error(value):
    from minigpt_cli.errors import ConvertError

    cfg = ModelConfig(vocab_size=257, max_seq_length=16, embed_dim=32, num_heads=4)
    raw = {**hf.gpt2_config(cfg, eot_id=256), "resid_pdrop": value}
    with pytest.raises(ConvertError, match="resid_pdrop"):
        hf.model_config(raw, "folder")
    raw["resid_pdrop"] = 0.1
    assert hf.model_config(raw, "folder").dropout == pytest.approx(0.1)

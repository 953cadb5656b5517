"""Fixtures shared across the test suite.

Test modules cannot import this file (``--import-mode=importlib``), so what several of them
need is here as a fixture: the toy model (``toy_config``, ``toy_gpt``, ``toy_model``), toy
runs and training configs (``toy_run``, ``train_config``), the byte tokenizer, the CLI in
process (``cli``), scripted model output for chat (``scripted_reply``), and the helpers that
read a run's metrics back.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from pathlib import Path

import pytest

import minigpt_tokenizers
from minigpt_tokenizers import Tokenizer


class ReverseByteTokenizer(Tokenizer):
    """A third-party-style plugin: UTF-8 bytes with ids mirrored (255 - byte), then end-of-text."""

    name = "reverse-byte"
    needs_training = False

    def __init__(self):
        self.spec, self.vocab_size, self.eot_id = "reverse-byte", 257, 256

    @classmethod
    def create(cls, arg, training_text=None):
        return cls()

    @classmethod
    def load(cls, directory: Path, meta: dict):
        return cls()

    def save_files(self, directory: Path) -> dict:
        return {}

    def encode(self, text: str) -> list[int]:
        return [255 - b for b in text.encode("utf-8", errors="surrogatepass")]

    def decode(self, ids) -> str:
        return bytes(255 - i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@pytest.fixture
def external_tokenizer(monkeypatch) -> type[Tokenizer]:
    """Register ``ReverseByteTokenizer`` as the entry point ``reverse-byte``, the way an
    installed third-party package would, for the duration of one test; returns the class.

    It lives in a stand-in module so a real ``EntryPoint`` can load it; both
    ``importlib.metadata.entry_points`` and the name ``minigpt_tokenizers`` imported are patched.
    """
    module = types.ModuleType("minigpt_test_plugin")
    module.ReverseByteTokenizer = ReverseByteTokenizer
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ep = importlib.metadata.EntryPoint(name=ReverseByteTokenizer.name,
                                       value=f"{module.__name__}:ReverseByteTokenizer",
                                       group=minigpt_tokenizers.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def entry_points(**params):
        eps = real(**params)
        if params.get("group") == minigpt_tokenizers.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints([*eps, ep])
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(minigpt_tokenizers, "entry_points", entry_points)
    return ReverseByteTokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Toy models run fastest, and steadiest on a busy machine, on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A token cache of the test's own, so tests never read or fill ~/.cache."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A data folder of the test's own (chat history), so tests never touch ~/.local/share."""
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def write_corpus(tmp_path, cache_dir):
    """``write_corpus(text)`` writes ``tmp_path/corpus.txt`` (the token cache is the test's
    own) and returns its path; ``write_corpus(lines=N)`` writes N short numbered lines."""
    def write(text: str | None = None, lines: int = 0) -> Path:
        if text is None:
            text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
                           for i in range(lines))
        path = tmp_path / "corpus.txt"
        path.write_text(text, encoding="utf-8")
        return path
    return write


@pytest.fixture(scope="session")
def toy_run(toy_config):
    """``toy_run(run_dir, dataset, seed=, step=, best_val_loss=, **model)``: a run directory
    as training leaves it (byte tokenizer, an untrained toy model, one best checkpoint)."""
    def make(run_dir: Path, dataset: Path, seed: int = 0, step: int = 12,
             best_val_loss: float = 5.25, **model) -> Path:
        import torch

        from minigpt_cli.config import Config
        from minigpt_cli.model.gpt import GPT
        from minigpt_cli.run import checkpoint, layout

        cfg = Config()
        cfg.model = toy_config(**model)
        cfg.data.dataset = str(dataset)
        torch.manual_seed(seed)
        layout.create_run_dir(run_dir)
        layout.write_run_files(run_dir, cfg, minigpt_tokenizers.create("byte"))
        checkpoint.save_checkpoint(run_dir, step, GPT(cfg.model),
                                   state={"best_val_loss": best_val_loss},
                                   training_tensors={}, best=True)
        return run_dir
    return make


@pytest.fixture(scope="session")
def chat_run():
    """``chat_run(run_dir)``: a run as fine-tuning on conversations leaves it (minigpt
    template, byte tokenizer), with far-from-flat logits and an end of turn that comes
    soon; returns it loaded."""
    def make(run_dir: Path):
        import torch

        from minigpt_cli.chat.template import TEMPLATES, save_run_template
        from minigpt_cli.config import Config, ModelConfig
        from minigpt_cli.model.gpt import GPT
        from minigpt_cli.run import layout
        from minigpt_cli.run.checkpoint import save_checkpoint
        from minigpt_cli.run.load import load_run

        tok = minigpt_tokenizers.create("byte")
        tok.add_special_tokens(TEMPLATES["minigpt"].special_tokens)
        cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_length=64, embed_dim=32,
                          num_heads=2, num_layers=2, ff_dim=64, dropout=0.0)
        torch.manual_seed(3)
        model = GPT(cfg)
        with torch.no_grad():
            model.transformer.wte.weight.mul_(20)
            model.transformer.wte.weight[tok.special_id("<|end|>")] *= 1.5
        config = Config()
        config.model = cfg
        layout.create_run_dir(run_dir)
        layout.write_run_files(run_dir, config, tok)
        save_run_template(run_dir, TEMPLATES["minigpt"])
        save_checkpoint(run_dir, 1, model, state={"best_val_loss": 1.0}, training_tensors={},
                        best=True)
        return load_run(run_dir)
    return make


# ---- the toy model -------------------------------------------------------------------------

TOY_MODEL = dict(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=2, num_layers=2,
                 ff_dim=64, dropout=0.0)


class ToyConfig:
    """``toy_config(**overrides)``: the suite's toy ``ModelConfig`` (the byte vocabulary of
    257, a context of 32, width 32, 2 heads, 2 layers, an MLP of 64, no dropout), with
    ``overrides`` for the tests that need another size.

    ``toy_config.overrides(**overrides)``: the same model as ``model.KEY=VALUE`` settings for
    a config built from a preset (the vocabulary is left to the tokenizer)."""

    def __call__(self, **overrides):
        from minigpt_cli.config import ModelConfig

        return ModelConfig(**{**TOY_MODEL, **overrides})

    def overrides(self, **overrides) -> list[str]:
        values = {**TOY_MODEL, **overrides}
        del values["vocab_size"]
        return [f"model.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def toy_config() -> ToyConfig:
    return ToyConfig()


@pytest.fixture(scope="session")
def toy_gpt(toy_config):
    """``toy_gpt(seed=0, **overrides)``: an untrained GPT of ``toy_config(**overrides)``,
    its weights drawn right after ``torch.manual_seed(seed)``, in eval mode."""
    def make(seed: int = 0, **overrides):
        import torch

        from minigpt_cli.model.gpt import GPT

        torch.manual_seed(seed)
        return GPT(toy_config(**overrides)).eval()
    return make


@pytest.fixture(scope="module")
def toy_model(toy_gpt):
    """``toy_gpt()``, built once per test module: for tests that only run it."""
    return toy_gpt()


@pytest.fixture(scope="session")
def byte_tok():
    """The built-in byte tokenizer (vocabulary 257, end-of-text 256)."""
    return minigpt_tokenizers.create("byte")


# ---- toy training runs ---------------------------------------------------------------------

TOY_TRAIN = ["train.batch_size=4", "train.log_interval=1", "train.eval_interval=5",
             "train.eval_iters=1", "train.checkpoint_interval=4", "train.warmup_steps=3",
             "train.learning_rate=3e-3", "train.device=cpu"]
TIMING_FIELDS = ("tokens_per_sec", "elapsed", "mfu")


@pytest.fixture(scope="session")
def toy_train_settings(toy_config) -> list[str]:
    """The ``section.key=value`` settings that shrink the tiny preset to a run of seconds:
    the toy model with one layer and dropout 0.1, batches of 4 on the CPU, a log line every
    step, an evaluation every 5 steps and a checkpoint every 4."""
    return [*toy_config.overrides(num_layers=1, dropout=0.1), *TOY_TRAIN]


@pytest.fixture(scope="session")
def train_config(toy_train_settings):
    """``train_config(corpus, *extra)``: the tiny preset on ``corpus`` with
    ``toy_train_settings``, then the settings ``extra``."""
    def make(corpus: Path, *extra: str):
        from minigpt_cli.config import Config

        return Config.from_sources("tiny", overrides=[f"data.dataset={corpus}",
                                                      *toy_train_settings, *extra])
    return make


@pytest.fixture
def corpus(write_corpus) -> Path:
    """The test's training text: 400 short numbered lines (modules that need other text
    define their own ``corpus``)."""
    return write_corpus(lines=400)


@pytest.fixture(scope="session")
def untimed_records():
    """``untimed_records(run_dir)``: a run's metrics.jsonl without the fields that measure
    time, so two runs of the same training compare equal."""
    def read(run_dir: Path) -> list[dict]:
        from minigpt_cli.run import layout

        lines = (run_dir / layout.METRICS_FILE).read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
                for line in lines]
    return read


@pytest.fixture(scope="session")
def stop_after():
    """``stop_after(run, steps)``: ask ``run``'s trainer to stop once it has logged ``steps``
    more steps."""
    def stop(run, steps: int) -> None:
        seen = []

        def callback(event):
            if type(event).__name__ == "Logged":
                seen.append(event.step)
                if len(seen) == steps:
                    run.trainer.request_stop()
        run.trainer.callbacks.append(callback)
    return stop


# ---- data ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """A cache folder for the whole session: the stdlib-docs corpus is built once."""
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="session")
def joined():
    """``joined(source, split)``: the whole text of one split of a data source."""
    return lambda source, split: "".join(source.iter_text(split))


# ---- generation and chat -------------------------------------------------------------------

@pytest.fixture(scope="session")
def run_engine():
    """``run_engine(model, tokenizer, prompt, settings=None, **fields) -> (events, result)``:
    every event the generation engine yields for ``prompt`` with ``settings`` (else
    ``SamplingSettings(**fields)``), and the ``GenerationResult`` it ends with."""
    def run(model, tokenizer, prompt, settings=None, **fields):
        from minigpt_cli.generate.decoding import SamplingSettings
        from minigpt_cli.generate.engine import Engine, GenerationResult

        settings = SamplingSettings(**fields) if settings is None else settings
        events = list(Engine(model, tokenizer).generate(prompt, settings))
        assert isinstance(events[-1], GenerationResult)
        return events[:-1], events[-1]
    return run


@pytest.fixture(scope="session")
def complete(run_engine):
    """``complete(model, tokenizer, prompt, settings) -> [text, ...]``: the text of every
    sample, without streaming."""
    def texts(model, tokenizer, prompt, settings) -> list[str]:
        _, result = run_engine(model, tokenizer, prompt, settings)
        return [s.text for s in result.samples]
    return texts


@pytest.fixture
def chat_session(toy_model, byte_tok):
    """``chat_session(template="chat", max_new_tokens=12, **kw)``: a greedy ChatSession on
    ``toy_model`` and the byte tokenizer, its model labelled ``runs/toy``."""
    from minigpt_cli.chat.session import ChatSession
    from minigpt_cli.generate.decoding import SamplingSettings
    from minigpt_cli.generate.engine import Engine

    def make(template: str = "chat", max_new_tokens: int = 12, **kw) -> ChatSession:
        settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
        return ChatSession(Engine(toy_model, byte_tok), settings, template=template,
                           model_label="runs/toy", **kw)
    return make


@pytest.fixture
def scripted_reply(monkeypatch, byte_tok):
    """``scripted_reply(text)``: from then on the model 'says' ``text`` (in byte tokens, then
    end-of-text) in every generation, whatever the prompt."""
    import torch

    from minigpt_cli.generate import cache, engine

    prefill = cache.CachedLM.prefill

    def script(text: str) -> None:
        tokens = iter([])

        def fake_prefill(self, idx):  # a new generation starts the text again
            nonlocal tokens
            tokens = iter([*byte_tok.encode(text), byte_tok.eot_id])
            return prefill(self, idx)

        def fake_sample_next(logits, settings, generator=None, recent=None):
            return torch.full((logits.size(0),), next(tokens, byte_tok.eot_id),
                              dtype=torch.long)

        monkeypatch.setattr(cache.CachedLM, "prefill", fake_prefill)
        monkeypatch.setattr(engine, "sample_next", fake_sample_next)

    return script


# ---- the command line, in process ----------------------------------------------------------

class Cli:
    """The real Typer app through ``typer.testing.CliRunner``; arguments may be anything that
    ``str()`` turns into one (paths, numbers)."""

    def __init__(self):
        from typer.testing import CliRunner

        self.runner = CliRunner()

    def invoke(self, *args, input: str | bytes | None = None):
        from minigpt_cli.cli.app import app

        return self.runner.invoke(app, [str(a) for a in args], input=input)

    def ok_text(self, *args, input: str | None = None) -> str:
        """stdout of a command that must succeed without a traceback."""
        result = self.invoke(*args, input=input)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        return result.stdout

    def ok_json(self, *args):
        """The JSON a successful command prints."""
        result = self.invoke(*args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    @staticmethod
    def assert_one_line_error(result, *needles: str) -> None:
        """Exit 1, no traceback, one ``Error:`` line on stderr holding every needle."""
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        message = result.stderr.strip()
        assert message.startswith("Error:") and "\n" not in message, message
        for needle in needles:
            assert needle in message, message


@pytest.fixture
def cli() -> Cli:
    return Cli()

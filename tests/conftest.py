"""Fixtures shared across the test suite."""

from __future__ import annotations

import importlib.metadata
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


@pytest.fixture
def toy_run():
    """``toy_run(run_dir, dataset, seed=, step=, best_val_loss=, **model)``: a run directory
    as training leaves it (byte tokenizer, an untrained 2-layer model, one best checkpoint)."""
    def make(run_dir: Path, dataset: Path, seed: int = 0, step: int = 12,
             best_val_loss: float = 5.25, **model) -> Path:
        import torch

        from minigpt_cli.config import Config, ModelConfig
        from minigpt_cli.model.gpt import GPT
        from minigpt_cli.run import checkpoint, layout

        cfg = Config()
        cfg.model = ModelConfig(**{**dict(vocab_size=257, max_seq_length=32, embed_dim=32,
                                          num_heads=2, num_layers=2, ff_dim=64, dropout=0.0),
                                   **model})
        cfg.data.dataset = str(dataset)
        torch.manual_seed(seed)
        layout.create_run_dir(run_dir)
        layout.write_run_files(run_dir, cfg, minigpt_tokenizers.create("byte"))
        checkpoint.save_checkpoint(run_dir, step, GPT(cfg.model),
                                   state={"best_val_loss": best_val_loss},
                                   training_tensors={}, best=True)
        return run_dir
    return make

"""Bad input, row by row: a one-line error on stderr (or, for the two lenient rows, a
warning and success), a non-zero exit, no traceback, and no existing file changed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minigpt_cli.cli.app import app
from minigpt_cli.config import Config
from minigpt_cli.run import checkpoint, layout
from minigpt_cli.train.setup import prepare

TOY = ["model.max_seq_length=32", "model.embed_dim=32", "model.num_heads=2",
       "model.num_layers=1", "model.ff_dim=64", "model.dropout=0.0", "train.batch_size=4",
       "train.log_interval=1", "train.eval_interval=4", "train.eval_iters=1",
       "train.checkpoint_interval=4", "train.warmup_steps=2", "train.device=cpu"]
SETS = [arg for item in TOY for arg in ("--set", item)]
RUN, CORPUS = "run", "corpus.txt"  # in each test's world folder
LINES = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(300)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A toy run trained for 4 steps (one checkpoint), with its corpus and token cache."""
    root = tmp_path_factory.mktemp("trained")
    (root / CORPUS).write_text("\n".join(LINES) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(root / ".cache"))
        cfg = Config.from_sources("tiny", overrides=[f"data.dataset={root / CORPUS}", *TOY,
                                                     "train.max_steps=4"])
        prepare(cfg, root / RUN).trainer.fit()
    return root


@pytest.fixture
def world(tmp_path: Path, trained: Path, monkeypatch) -> Path:
    """A copy of the trained run and its corpus; the current folder and the cache are here."""
    w = tmp_path / "w"
    shutil.copytree(trained, w)
    cfg = w / RUN / layout.CONFIG_FILE  # the copy trains on its own corpus
    cfg.write_text(cfg.read_text().replace(str(trained / CORPUS), str(w / CORPUS)))
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(w / ".cache"))
    monkeypatch.chdir(w)
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---- setups: each damages or prepares the world and returns the command line ----------------

def train(*args: str, steps: str | None = "2") -> Callable[[Path], list[str]]:
    length = ["--max-steps", steps] if steps else []
    return lambda w: ["train", "--dataset", str(w / CORPUS), "--out", str(w / "new"),
                      *length, *SETS, *args]


def with_file(name: str, content: bytes | str, option: str = "--dataset", prefix: str = "",
              suffix: str = "") -> Callable[[Path], list[str]]:
    """Write ``name``, then train with ``option PREFIX/path/to/name/SUFFIX``."""
    def setup(w: Path) -> list[str]:
        path = w / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return train(option, f"{prefix}{path}{suffix}")(w)
    return setup


def config_file(text: str) -> Callable[[Path], list[str]]:
    def setup(w: Path) -> list[str]:
        (w / "my.yaml").write_text(text)
        return ["train", "--config", str(w / "my.yaml"), "--out", str(w / "new")]
    return setup


def lora_on_run(*args: str) -> Callable[[Path], list[str]]:
    """Fine-tune the trained run (its own model: none of the toy model settings)."""
    return lambda w: ["train", "--init", str(w / RUN), "--dataset", str(w / CORPUS), "--out",
                      str(w / "new"), "--max-steps", "2", "--device", "cpu", *args]


def resume(*args: str) -> Callable[[Path], list[str]]:
    return lambda w: ["train", "--out", str(w / RUN), "--resume", *args]


def best_dir(w: Path) -> Path:
    return checkpoint.checkpoint_dir(w / RUN, "best")


def truncate(w: Path) -> None:
    path = best_dir(w) / checkpoint.MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(w: Path) -> None:
    path = best_dir(w) / checkpoint.MODEL_FILE
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_config(w: Path) -> None:
    path = w / RUN / layout.CONFIG_FILE
    path.write_text(path.read_text().replace("ff_dim: 64", "ff_dim: 128"))


def tokenizer_json(files: dict[str, bytes] | None = None, **meta) -> Callable[[Path], None]:
    """Replace the run's tokenizer.json (and add ``files`` beside it)."""
    def setup(w: Path) -> None:
        tok = w / RUN / layout.TOKENIZER_DIR
        for name, content in (files or {}).items():
            (tok / name).write_bytes(content)
        (tok / "tokenizer.json").write_text(json.dumps({"spec": "x", "vocab_size": 257,
                                                        "eot_id": 256, **meta}))
    return setup


def outside_link(w: Path) -> None:
    (w / "elsewhere.bin").write_bytes(b"\0" * 64)
    weights = best_dir(w) / checkpoint.MODEL_FILE
    weights.unlink()
    weights.symlink_to(w / "elsewhere.bin")


def pointer_out(w: Path) -> None:
    (w / RUN / layout.CKPT_DIR / "best.json").write_text(json.dumps({"dir": "../../elsewhere"}))


def pointer_to(name: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / RUN / layout.CKPT_DIR / "best.json").write_text(json.dumps({"dir": name}))
    return setup


def not_a_run(w: Path) -> None:
    (w / "folder").mkdir()
    (w / "folder" / "notes.txt").write_text("hello")


def no_space(monkeypatch) -> None:
    def full(path: Path, data: bytes) -> None:
        Path(path).write_bytes(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(checkpoint, "write_synced", full)


def killed_before_a_checkpoint(w: Path) -> list[str]:
    """A run killed (-9) before its first checkpoint: its config, no checkpoint."""
    (w / "killed").mkdir()
    shutil.copy(w / RUN / layout.CONFIG_FILE, w / "killed" / layout.CONFIG_FILE)
    return train("--out", str(w / "killed"))(w)


def no_memory_in_a_step(monkeypatch) -> None:
    from minigpt_cli.train.trainer import Trainer

    def step(self, lr):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(Trainer, "_train_step", step)


def no_cxx_compiler(monkeypatch) -> None:
    """torch.compile as it fails on a machine without a working C++ compiler."""
    from torch._inductor.exc import InvalidCxxCompiler

    from minigpt_cli.model.gpt import GPT

    def compiled(self):
        def forward(*args, **kwargs):
            raise InvalidCxxCompiler()
        return forward
    monkeypatch.setattr(GPT, "compile_for_training", compiled)


GENERATE = ["generate", "--model", RUN, "--prompt", "The", "--max-new-tokens", "3", "--seed",
            "1", "--device", "cpu"]
USES_MODEL = {
    "generate": GENERATE,
    "eval": ["eval", "--model", RUN, "--device", "cpu", "--json"],
    "chat": ["chat", "--model", RUN, "--max-new-tokens", "3", "--device", "cpu"],
}


@dataclass
class Row:
    id: str
    setup: Callable[[Path], list[str] | None]  # returns the command line (or None: uses_model)
    says: str  # a piece of the one line on stderr
    command: list[str] | None = None  # for rows that damage the run: the command to run
    ok: bool = False  # succeeds with a warning instead
    patch: Callable | None = None  # gets monkeypatch: simulate a failure
    needs_no_gpu: bool = False


TRAIN_ROWS = [
    Row("unknown preset", lambda w: ["train", "--preset", "no-such"], "unknown preset"),
    Row("yaml syntax error", config_file("model:\n  embed_dim: 32\n  num_heads: [2\n"),
        "YAML syntax error at line"),
    Row("unknown key", train("--set", "model.heads=2"), "unknown config key 'model.heads'"),
    Row("unknown section in a file", config_file("trian:\n  max_steps: 3\n"),
        "unknown section 'trian'"),
    Row("mistyped value", train("--set", "model.num_layers=two"),
        "model.num_layers must be int"),
    Row("zero size", train("--set", "model.embed_dim=0"), "model.embed_dim must be positive"),
    Row("negative batch", train("--set", "train.batch_size=-4"),
        "train.batch_size must be positive"),
    Row("heads do not divide", train("--set", "model.num_heads=3"), "divisible"),
    Row("dropout 1", train("--set", "model.dropout=1.0"), "model.dropout must be in [0, 1)"),
    Row("dropout negative", train("--set", "model.dropout=-0.1"), "model.dropout"),
    Row("learning rate 0", train("--set", "train.learning_rate=0"),
        "train.learning_rate must be positive"),
    Row("learning rate negative", train("--set", "train.learning_rate=-1e-3"),
        "train.learning_rate must be positive"),
    Row("keep_last negative", train("--set", "train.keep_last=-1"), "train.keep_last"),
    Row("seed below 0", train("--seed", "-1"), "train.seed must be between 0 and 2**64 - 1"),
    Row("seed of 2**64", train("--seed", str(2**64)), "train.seed must be between 0 and"),
    Row("seed below 0 in --set", train("--set", "train.seed=-5"), "train.seed must be between"),
    Row("epochs nan", train("--epochs", "nan", steps=None),
        "train.epochs must be a finite number, got nan"),
    Row("epochs inf", train("--epochs", "inf", steps=None),
        "train.epochs must be a finite number, got inf"),
    Row("learning rate nan", train("--set", "train.learning_rate=nan"),
        "train.learning_rate must be a finite number"),
    Row("weight decay nan", train("--set", "train.weight_decay=nan"),
        "train.weight_decay must be a finite number"),
    Row("epochs and max-steps", train("--epochs", "1"), "train.epochs and train.max_steps both"),
    Row("precision the CPU lacks", train("--set", "train.precision=fp16"),
        "fp16 is not supported on the CPU"),
    Row("dataset missing", train("--dataset", "missing.txt"), "not found: missing.txt"),
    Row("dataset empty", with_file("empty.txt", ""), "is empty"),
    Row("dataset binary", with_file("data.bin", b"\x7fELF\x02\x01\x00\x00" * 64), "binary"),
    Row("dataset not utf-8", with_file("latin1.txt", "café crème\n".encode("latin-1") * 50),
        "not UTF-8"),
    Row("data shorter than a context", with_file("short.txt", "hello\nworld\n" * 2),
        "fewer than one context window"),
    Row("unknown tokenizer", train("--tokenizer", "wordpiece"), "unknown tokenizer"),
    Row("tiktoken file missing", train("--tokenizer", "tiktoken:nowhere/gpt2.tiktoken"),
        "not found"),
    Row("tiktoken file corrupt", with_file("bad.tiktoken", b"not base64!! x\n",
                                           option="--tokenizer", prefix="tiktoken:"),
        "not a tiktoken ranks file"),
    Row("sentencepiece file missing", train("--tokenizer", "sentencepiece:nowhere/x.model"),
        "not found"),
    Row("sentencepiece file corrupt", with_file("bad.model", b"\x00garbage" * 40,
                                                option="--tokenizer", prefix="sentencepiece:"),
        "not a valid sentencepiece model"),
    Row("existing run without --resume", train("--out", RUN), "already exists"),
    Row("a run killed before its first checkpoint", killed_before_a_checkpoint,
        "stopped before its first checkpoint: remove it and train again"),
    Row("out is a file", with_file("afile", "x", option="--out"), "is a file"),
    Row("out cannot be written", with_file("afile", "x", option="--out", suffix="/run"),
        "not a writable directory"),
    Row("resume with nothing to resume", lambda w: ["train", "--out", str(w / "nope"),
                                                    "--resume"], "nothing to resume"),
    Row("resume with another model shape", resume("--set", "model.num_layers=2"),
        "cannot resume with model.num_layers=2"),
    Row("resume with another tokenizer", resume("--tokenizer", "char"),
        "cannot resume with tokenizer.spec"),
    Row("resume with another dataset", resume("--dataset", "other.txt"),
        "cannot resume with data.dataset"),
    # the run's own settings but the preset's dataset (stdlib-docs, the built-in default)
    Row("resume with a preset's dataset", resume("--preset", "tiny", *SETS, "--max-steps", "8"),
        "cannot resume with data.dataset='stdlib-docs'"),
    Row("resume with a preset's batch size",
        lambda w: resume("--preset", "tiny", "--dataset", str(w / CORPUS), "--max-steps", "8",
                         *[a for item in TOY if item != "train.batch_size=4"
                           for a in ("--set", item)])(w),
        "cannot resume with train.batch_size=16"),
    Row("resume a finished run", resume(), "already finished its 4 steps"),
    Row("resume with fewer steps than it did", resume("--max-steps", "2"),
        "is at step 4, past the 2 asked for"),
    Row("resume after the data changed",
        lambda w: (w / CORPUS).write_text("\n".join(LINES * 2)) and resume("--max-steps", "8")(w),
        "training data of"),
    Row("resume with damaged weights", lambda w: truncate(w) or resume("--max-steps", "8")(w),
        "no intact checkpoint to resume from"),
    Row("cuda without a GPU", train("--device", "cuda"), "no CUDA GPU", needs_no_gpu=True),
    Row("cuda without a GPU, in several processes", train("--device", "cuda", "--nproc", "2"),
        "--device cuda was asked for but no CUDA GPU", needs_no_gpu=True),
    Row("unknown device", train("--device", "tpu"), "train.device must be"),
    Row("disk full while saving", train(), "No space left on device", patch=no_space),
    # failures after the run directory is made, before the first checkpoint: it is taken back
    Row("a model too big for the memory", train("--set", f"model.ff_dim={2**40}"),
        "the model does not fit in the memory of cpu"),
    Row("out of memory in the first step", train(), "out of memory on cpu at step 1",
        patch=no_memory_in_a_step),
    Row("diverged before the first checkpoint",
        train("--set", "train.learning_rate=1e30", "--set", "train.grad_clip=0", steps="3"),
        "last good checkpoint: none yet"),
    Row("torch.compile without a C++ compiler", train("--compile"),
        "torch.compile failed (No working C++ compiler", patch=no_cxx_compiler),
    Row("lora rank 0", lora_on_run("--lora", "0"), "--lora (lora.rank) must be a positive"),
    Row("lora rank below 0", lora_on_run("--lora", "-3"), "--lora (lora.rank) must be a positive"),
    Row("lora rank below 0 in a config", lora_on_run("--set", "lora.rank=-1"),
        "lora.rank must be positive"),
    Row("lora target matching no module", lora_on_run("--lora", "4", "--set",
                                                      "lora.targets=c_attn, q_proj"),
        "lora.targets: 'q_proj' matches no module"),
    Row("lora without a base", train("--lora", "4"), "lora.rank needs a base model"),
]

MODEL_ROWS = [
    Row("model missing", lambda w: None, "does not exist", command=["--model", "nowhere"]),
    Row("model not a run directory", not_a_run, "not a minigpt run directory",
        command=["--model", "folder"]),
    Row("weights truncated", truncate, "truncated"),
    Row("weights corrupt", flip_bytes, "sha256 does not match"),
    Row("weights do not match the config", edit_config, "do not match the run's config"),
    Row("tokenizer files missing",
        lambda w: (w / RUN / "tokenizer" / "tokenizer.json").unlink(), "tokenizer files missing"),
    Row("tiktoken ranks missing", tokenizer_json(name="tiktoken", ranks_file="ranks.tiktoken"),
        "tiktoken ranks file not found"),
    Row("sentencepiece model corrupt",
        tokenizer_json(name="sentencepiece", model_file="tokenizer.model",
                       files={"tokenizer.model": b"\x00garbage" * 40}),
        "not a valid sentencepiece model"),
    Row("tokenizer file outside the run",
        tokenizer_json(name="tiktoken", ranks_file="../../corpus.txt"), "points outside"),
    Row("weights linked outside the run", outside_link, "points outside"),
    Row("pointer outside the run", pointer_out, "points outside"),
    Row("pointer naming no checkpoint", pointer_to("step-9999"),
        "names 'step-9999', which is not a checkpoint of this run"),
    Row("pointer to a missing checkpoint", pointer_to("step-0009999"),
        "step-0009999 does not exist"),
]

GENERATE_ROWS = [
    Row("prompt longer than the context", lambda w: GENERATE[:4] + ["x" * 200] + GENERATE[5:],
        "only the last 32", ok=True),
    Row("empty prompt", lambda w: GENERATE[:4] + [""] + GENERATE[5:], "prompt is empty", ok=True),
    Row("temperature below 0", lambda w: GENERATE + ["--temperature", "-0.5"],
        "--temperature must be >= 0"),
    Row("top-p 0", lambda w: GENERATE + ["--top-p", "0"], "--top-p must be in (0, 1]"),
    Row("top-p above 1", lambda w: GENERATE + ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    Row("top-k below 0", lambda w: GENERATE + ["--top-k", "-1"], "--top-k must be >= 0"),
    Row("max-new-tokens 0", lambda w: GENERATE + ["--max-new-tokens", "0"],
        "--max-new-tokens must be at least 1"),
    Row("chat temperature below 0", lambda w: USES_MODEL["chat"] + ["--temperature", "-1"],
        "--temperature must be >= 0"),
    Row("eval text file missing", lambda w: USES_MODEL["eval"] + ["--text-file", "no.txt"],
        "no.txt"),
]


def expand(row: Row) -> list:
    if row in MODEL_ROWS:
        out = []
        for name, base in USES_MODEL.items():
            args = base if row.command is None else [base[0], *row.command, *base[3:]]
            out.append(pytest.param(row, args, id=f"{name}: {row.id}"))
        return out
    return [pytest.param(row, None, id=row.id)]


ROWS = [p for row in TRAIN_ROWS + MODEL_ROWS + GENERATE_ROWS for p in expand(row)]


@pytest.mark.parametrize(("row", "command"), ROWS)
def test_bad_input(row: Row, command: list[str] | None, world: Path, monkeypatch):
    if row.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = row.setup(world)
    args = command if command is not None else args
    if row.patch:
        row.patch(monkeypatch)
    before = snapshot(world)

    result = CliRunner().invoke(app, args, input="")

    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert row.says.lower() in err.lower(), err
    if row.ok:
        assert result.exit_code == 0, err
        assert "Warning" in err
    else:
        assert result.exit_code != 0
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("Error:"), err
    after = snapshot(world)
    assert {k: after.get(k) for k in before} == before, "an existing file changed"
    if row in TRAIN_ROWS:  # refused before the run directory is made, or taken back after
        assert not (world / "new").exists(), sorted(after)


@pytest.mark.parametrize("args", [
    ["export", "--model", RUN, "--out", "a" * 260],
    ["export", "--model", RUN, "--format", "gguf", "--out", "a" * 260 + ".gguf"],
    ["train", "--dataset", CORPUS, *SETS, "--max-steps", "1", "--out", "a" * 260],
])
def test_a_path_the_system_refuses_is_one_line_and_writes_nothing(world, cli, args):
    before = snapshot(world)
    cli.assert_one_line_error(cli.invoke(*args), "File name too long")
    assert snapshot(world) == before

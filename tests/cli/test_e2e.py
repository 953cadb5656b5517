"""End to end through the real command line, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"


def minigpt(*args: str, cwd: Path, stdin: str | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(cwd / ".cache"),
           "MINIGPT_DATA_DIR": str(cwd / ".data"), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd, env=env,
                          input=stdin if stdin is not None else "", capture_output=True,
                          text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared is not present")
    cwd = tmp_path_factory.mktemp("e2e")
    out = ok(minigpt("train", "--preset", "tiny", "--dataset", str(SHAKESPEARE),
                     "--max-steps", "40", "--set", "model.num_layers=2",
                     "--set", "train.eval_interval=20", "--set", "train.log_interval=10",
                     cwd=cwd))
    assert "Done: 40 steps" in out
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1
    metrics = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    return cwd


def test_generate_is_reproducible_with_a_seed(trained):
    args = ("generate", "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "7")
    first = ok(minigpt(*args, cwd=trained))
    assert "ROMEO:" in first
    assert ok(minigpt(*args, cwd=trained)) == first


def test_eval_json(trained):
    report = json.loads(ok(minigpt("eval", "--json", cwd=trained)))
    report = report[0] if isinstance(report, list) else report
    assert report["loss"] > 0
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-3)


def test_inspect_model_and_env(trained):
    out = ok(minigpt("inspect", "model", cwd=trained))
    assert "byte" in out
    ok(minigpt("inspect", "env", cwd=trained))


def test_chat_with_piped_input(trained):
    out = ok(minigpt("chat", cwd=trained, stdin="Hello there\nWhat say you?\n"))
    assert out.strip()


def test_resume_continues_the_run(trained):
    run = next((trained / "runs").iterdir())
    out = ok(minigpt("train", "--out", str(run), "--resume", "--max-steps", "45", cwd=trained))
    assert "Done: 45 steps" in out


def test_unknown_preset_is_one_line(tmp_path):
    result = minigpt("train", "--preset", "no-such-preset", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no-such-preset" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_shows_examples(tmp_path):
    for command in ("train", "generate", "chat", "eval", "inspect"):
        out = ok(minigpt(command, "--help", cwd=tmp_path))
        assert "minigpt " + command in out or "Examples" in out


def test_small_preset_with_the_gpt2_file(tmp_path):
    if not GPT2_RANKS.is_file():
        pytest.skip("../shared is not present")
    out = ok(minigpt("train", "--preset", "small", "--dataset", str(SHAKESPEARE),
                     "--tokenizer", f"tiktoken:{GPT2_RANKS}", "--max-steps", "4",
                     "--set", "train.eval_iters=2", "--out", "runs/small", cwd=tmp_path))
    assert "Done: 4 steps" in out
    report = json.loads(ok(minigpt("eval", "--model", "runs/small", "--json", cwd=tmp_path)))
    report = report[0] if isinstance(report, list) else report
    assert report["loss"] > 0


def test_ctrl_c_saves_and_resumes(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared is not present")
    import signal
    import time

    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / ".cache")}
    args = [sys.executable, "-m", "minigpt_cli", "train", "--preset", "tiny", "--dataset",
            str(SHAKESPEARE), "--max-steps", "100000", "--out", "runs/stop",
            "--set", "model.num_layers=1", "--set", "train.log_interval=1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "stop" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists()
                                      or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "minigpt train --out runs/stop --resume" in err
    state = json.loads((tmp_path / "runs" / "stop" / "checkpoints" / "latest.json").read_text())
    stopped_at = state["step"]
    assert stopped_at >= 3
    result = minigpt("train", "--out", "runs/stop", "--resume", "--max-steps",
                     str(stopped_at + 2), cwd=tmp_path)
    assert f"Done: {stopped_at + 2} steps" in ok(result)

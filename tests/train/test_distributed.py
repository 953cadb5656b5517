"""Training in several processes on the CPU (gloo, 2 ranks), through the real command line:
DDP against one process with the same global batch, exact resume after Ctrl-C, kill -9 of a
rank, FSDP, and the bad input of a job.

The random interruption step comes from a seed printed by each test; ``MINIGPT_TEST_SEED=N``
replays one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt_cli.data.batches import WindowSampler

TOY = ["model.num_layers=1", "model.embed_dim=32", "model.num_heads=2", "model.ff_dim=64",
       "model.max_seq_length=32", "model.dropout=0.0", "train.log_interval=1",
       "train.eval_interval=5", "train.eval_iters=2", "train.checkpoint_interval=4",
       "train.warmup_steps=3", "train.learning_rate=3e-3", "train.device=cpu",
       "train.precision=fp32"]
TIMING = ("tokens_per_sec", "elapsed", "mfu")


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
                for i in range(400)))
    return tmp_path


def _start(cwd: Path, *args: str, settings=(), timeout_s: int = 20) -> subprocess.Popen:
    (cwd / "tmp").mkdir(exist_ok=True)  # the job's temporary files: it must take them back
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(cwd / "cache"), "COLUMNS": "200",
           "OMP_NUM_THREADS": "1", "MINIGPT_DIST_TIMEOUT": str(timeout_s),
           "TMPDIR": str(cwd / "tmp")}
    sets = [a for item in [*TOY, *settings] for a in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "minigpt_cli", "train", "--preset", "tiny",
                             "--dataset", str(cwd / "corpus.txt"), *sets, *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(cwd: Path, *args: str, settings=(), timeout: int = 240) -> tuple[int, str, str]:
    proc = _start(cwd, *args, settings=settings)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _checkpointed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, ValueError):
        return 0


def _logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the ranks of a ``--nproc`` job)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def seed() -> int:
    value = os.environ.get("MINIGPT_TEST_SEED")
    chosen = int(value) if value else int.from_bytes(os.urandom(4), "big")
    print(f"seed {chosen} (replay with MINIGPT_TEST_SEED={chosen})")
    return chosen


def test_the_sampler_splits_each_batch_over_the_ranks():
    import numpy as np

    tokens = np.arange(2000)
    one = WindowSampler(tokens, 16, seed=3)
    ranks = [WindowSampler(tokens, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # past an epoch (124 windows) too
        whole = one.next_starts(8)
        assert [*ranks[0].next_starts(4), *ranks[1].next_starts(4)] == list(whole)
    assert ranks[0].consumed == ranks[1].consumed == one.consumed


def test_ddp_matches_one_process_with_the_same_global_batch(workdir):
    steps = ["--max-steps", "50"]
    code, _, err = _run(workdir, "--out", "one", *steps, settings=["train.batch_size=8"])
    assert code == 0, err
    code, out, err = _run(workdir, "--out", "two", "--nproc", "2", *steps,
                          settings=["train.batch_size=4"])
    assert code == 0, err
    assert "global batch 8" in out and out.count("Done: 50 steps") == 1  # one panel
    one, two = _losses(workdir / "one"), _losses(workdir / "two")
    assert sorted(one) == sorted(two) == list(range(1, 51))
    gap = max(abs(one[s] - two[s]) for s in one)
    print(f"largest loss gap over 50 steps: {gap:.2e}")
    assert gap < 1e-5
    val = [(a["val_loss"], b["val_loss"]) for a, b in
           zip(_records(workdir / "one"), _records(workdir / "two"), strict=True)
           if "val_loss" in a]
    assert max(abs(a - b) for a, b in val) < 1e-5
    assert {r.get("global_batch") for r in _records(workdir / "two") if "loss" in r} == {8}
    # torch's launcher left a folder of error files per job (its compiler cache may stay)
    assert not [p for p in (workdir / "tmp").iterdir() if not p.name.startswith("torchinductor_")]


def test_ddp_resume_after_ctrl_c_is_exact(workdir, seed):
    args = ["--nproc", "2", "--max-steps", "30"]
    settings = ["train.batch_size=4", "model.dropout=0.1", "train.checkpoint_interval=3"]
    code, _, err = _run(workdir, "--out", "reference", *args, settings=settings)
    assert code == 0, err
    target = random.Random(seed).randrange(5, 22)
    proc = _start(workdir, "--out", "run", *args, settings=settings)
    deadline = time.monotonic() + 120
    while _logged(workdir / "run") < target or _checkpointed(workdir / "run") == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seed, target, err)
    assert "Traceback" not in err, err
    assert err.count("Stopped at step") == 1, err
    assert "minigpt train --nproc 2 --out run --resume" in err
    code, out, err = _run(workdir, "--out", "run", "--resume", *args, settings=settings)
    assert code == 0, (seed, target, err)
    assert _records(workdir / "run") == _records(workdir / "reference"), (seed, target)


def test_sigterm_to_one_rank_stops_the_job_as_sigterm(workdir):
    proc = _start(workdir, "--out", "run", "--nproc", "2", "--max-steps", "400",
                  settings=["train.batch_size=4"])
    deadline = time.monotonic() + 120
    while _logged(workdir / "run") < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGTERM)  # rank 1, say, from a scheduler: not rank 0
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # the other rank stopped on the agreement, with its code
    assert err.count("Stopped at step") == 1 and "Traceback" not in err, err


def test_kill_9_of_a_rank_ends_the_job_and_it_resumes(workdir):
    args = ["--out", "run", "--nproc", "2", "--max-steps", "400"]
    proc = _start(workdir, *args, settings=["train.batch_size=4"])
    deadline = time.monotonic() + 120
    while _checkpointed(workdir / "run") < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ranks = [pid for pid in _children(proc.pid)]
    assert len(ranks) == 2, ranks
    killed_at = time.monotonic()
    os.kill(max(ranks), signal.SIGKILL)
    _, err = proc.communicate(timeout=90)
    took = time.monotonic() - killed_at
    print(f"the job ended {took:.1f} s after kill -9 of a rank")
    assert took < 60
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert "was killed by SIGKILL" in err, err
    assert not any(_alive(pid) for pid in ranks)
    code, out, err = _run(workdir, "--out", "run", "--resume", "--nproc", "2",
                          "--max-steps", "20", settings=["train.batch_size=4"])
    assert code == 0, err
    assert "Done: 20 steps" in out


def test_fsdp_trains_saves_a_plain_run_and_resumes(workdir):
    ddp = ["train.batch_size=4", "train.min_lr_ratio=1.0"]  # no decay: 8 + 4 steps = 12
    fsdp = [*ddp, "train.strategy=fsdp"]
    code, _, err = _run(workdir, "--out", "ddp", "--nproc", "2", "--max-steps", "12",
                        settings=ddp)
    assert code == 0, err
    code, out, err = _run(workdir, "--out", "fsdp", "--nproc", "2", "--max-steps", "8",
                          settings=fsdp)
    assert code == 0, err
    assert "(fsdp)" in out
    code, out, err = _run(workdir, "--out", "fsdp", "--nproc", "2", "--resume",
                          "--max-steps", "12", settings=fsdp)
    assert code == 0, err
    ddp, sharded = _losses(workdir / "ddp"), _losses(workdir / "fsdp")
    assert max(abs(ddp[s] - sharded[s]) for s in ddp) < 1e-4
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(workdir / "cache")}
    gen = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--model", "fsdp",
                          "--prompt", "line", "--max-new-tokens", "5", "--seed", "1"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], err


def test_an_unknown_strategy_is_one_line(workdir):
    code, _, err = _run(workdir, "--nproc", "2", "--max-steps", "2",
                        settings=["train.strategy=zero3"])
    _one_line_error(code, err, "strategy must be ddp or fsdp")


def test_resuming_with_another_world_size_is_refused(workdir):
    code, _, err = _run(workdir, "--out", "run", "--nproc", "2", "--max-steps", "4",
                        settings=["train.batch_size=4"])
    assert code == 0, err
    code, _, err = _run(workdir, "--out", "run", "--resume", "--max-steps", "8",
                        settings=["train.batch_size=4"])
    _one_line_error(code, err, "2 processes, not 1")
    code, _, err = _run(workdir, "--out", "run", "--resume", "--max-steps", "8",
                        "--nproc", "2", settings=["train.batch_size=4"])
    assert code == 0, err


def test_more_processes_than_cores_warns_and_too_big_a_batch_is_one_line(workdir):
    too_many = (os.cpu_count() or 1) + 1
    big = ["train.batch_size=400"]
    code, _, err = _run(workdir, "--nproc", str(too_many), "--max-steps", "1", settings=big)
    assert f"--nproc {too_many} is more than the" in err
    _one_line_error(code, err, "windows a step")


def test_a_dead_rendezvous_endpoint_is_one_line(workdir, monkeypatch):
    # a job id of its own: another test run on this machine at the same endpoint must not
    # make up the second node
    monkeypatch.setenv("MINIGPT_RUN_ID", f"dead-endpoint-{os.getpid()}-{time.time_ns()}")
    proc = _start(workdir, "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint",
                  "127.0.0.1:9", "--max-steps", "1", timeout_s=5)
    _, err = proc.communicate(timeout=120)
    _one_line_error(proc.returncode, err, "could not meet")


SETUP_RANK = """
import os, sys
import torch
from minigpt_cli.errors import MiniGPTError
from minigpt_cli.train import distributed
distributed.init(torch.device("cpu"))
if distributed.info().rank == 1:
    os._exit(0)  # gone before the weights are shared
try:
    with distributed.setting_up():
        for _ in range(50):
            distributed.broadcast_module(torch.nn.Linear(64, 64))
except MiniGPTError as e:
    print(type(e).__name__, e.message)
    sys.exit(1)
finally:  # as `minigpt train` does: exiting with gloo's threads alive can abort the process
    distributed.cleanup()
"""


def test_a_rank_lost_while_setting_up_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "MINIGPT_DIST_TIMEOUT": "10", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SETUP_RANK], cwd=tmp_path,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[0].returncode == 1, err
    assert "Traceback" not in err, err
    assert out.startswith("PeerLost rank 0 lost the other processes while setting up the run"), out


# ---- in process: what a rank says ------------------------------------------------------------

def test_rank_0_interrupted_while_setting_up_says_so_when_its_peers_are_gone(monkeypatch):
    """Ctrl-C reaches every rank: rank 0's news is the interrupt, not the peers that left."""
    import torch

    from minigpt_cli.config import Config
    from minigpt_cli.train import distributed, setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def peers_gone(obj=None, long_wait=True):
        raise distributed.lost(RuntimeError("Connection closed by peer"), None)

    monkeypatch.setattr(distributed, "init",
                        lambda device: (distributed.DistInfo(0, 0, 2), torch.device("cpu")))
    monkeypatch.setattr(setup, "_prepare_data", interrupted)
    monkeypatch.setattr(distributed, "share_from_main", peers_gone)
    with pytest.raises(KeyboardInterrupt):
        setup.prepare(Config.from_sources("tiny"), None)


@pytest.mark.parametrize(("rank", "says"), [("0", "Interrupted."), ("1", "")])
def test_ctrl_c_while_setting_up_is_said_once_by_rank_0(rank, says, cli, monkeypatch):
    from minigpt_cli.train import setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(setup, "prepare", interrupted)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli.invoke("train", "--max-steps", "2")
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == says


def test_a_rank_lost_before_any_checkpoint_is_not_told_to_resume():
    from minigpt_cli.train import distributed

    gone = RuntimeError("Connection closed by peer")
    assert "resume" in distributed.lost(gone, 12, Path("run/checkpoints/step-0000010")).hint
    early = distributed.lost(gone, 3, None)
    assert "no checkpoint was saved yet" in early.message and "resume" not in early.hint


def test_the_launcher_silences_torchs_own_log_lines(monkeypatch):
    """The ranks say what failed; torch's launcher loggers (each with a level of its own)
    would add lines such as 'Received 2 death signal, shutting down workers'."""
    import logging

    import torch.distributed.launcher.api as launcher

    from minigpt_cli.train import distributed

    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]
    for name in names:  # put back as they were afterwards
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    monkeypatch.setattr(launcher, "elastic_launch", lambda config, entrypoint: lambda *a: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.launch(2, ["train"]) == (0, [])
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    assert not agent.isEnabledFor(logging.WARNING)

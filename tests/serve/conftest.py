"""A real ``minigpt serve`` process on a free port, over a toy run, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``minigpt serve`` in a subprocess: ``url``, ``model_id``, ``run_dir``, ``proc``."""

    def __init__(self, run_dir: Path, *args: str, api_key: str | None = None):
        self.run_dir, self.model_id, self.api_key = run_dir, run_dir.name, api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "minigpt_cli", "serve", "--model", str(run_dir),
               "--port", str(self.port), "--device", "cpu", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("the server did not start within 60 s")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture(scope="session")
def serve_run(toy_run, tmp_path_factory) -> Path:
    """A toy run with a context of 2048 (the byte tokenizer), trained for 0 steps."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "data.txt"
    data.write_text("hello\n")
    return toy_run(root / "toy", data, seed=4, step=42, best_val_loss=3.5,
                   max_seq_length=2048)


@pytest.fixture(scope="session")
def server(serve_run):
    """One server for the session: batches of 4, a queue of 32, an API key."""
    s = Server(serve_run, "--max-batch", "4", "--max-queue", "32", api_key=API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def start_server(serve_run):
    """``start_server(*flags, api_key=None, run_dir=None)``: another server over the toy run
    (or ``run_dir``), of the
    test's own (stop it with ``.stop()``, which sends SIGTERM and returns (code, stderr))."""
    return lambda *flags, api_key=None, run_dir=None: Server(run_dir or serve_run, *flags,
                                                             api_key=api_key)

"""The benchmark scripts in ``benchmarks/``: bad arguments are a usage error and a command
that fails is reported, never timed as if it had run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_startup_refuses_to_time_a_command_that_fails():
    startup = _script("startup")
    fails = [sys.executable, "-c", "import sys; sys.exit('broken install')"]
    with pytest.raises(SystemExit, match="exit code 1: broken install"):
        startup.median_seconds(fails, runs=1)
    assert startup.median_seconds([sys.executable, "-c", "pass"], runs=1) > 0


@pytest.mark.parametrize("script, args", [("startup.py", ["--runs", "0"]),
                                          ("tokenization.py", ["--mb", "0"]),
                                          ("tokenization.py", ["--mb", "-3"])])
def test_bad_arguments_are_a_usage_error(script, args):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, cwd=BENCHMARKS)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "must be at least 1" in done.stderr

"""Start-up time of the `minigpt` command, with `python -c "import torch"` beside it.

Each figure is the median of several fresh processes (the first run of each is a warm-up,
so the file cache is warm for all of them alike). Run from anywhere:

    python benchmarks/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "minigpt --version": ["minigpt", "--version"],
    "minigpt --help": ["minigpt", "--help"],
    "minigpt train --help": ["minigpt", "train", "--help"],
    "minigpt generate --help": ["minigpt", "generate", "--help"],
    "minigpt chat --help": ["minigpt", "chat", "--help"],
    "minigpt eval --help": ["minigpt", "eval", "--help"],
    "minigpt inspect --help": ["minigpt", "inspect", "--help"],
    "minigpt inspect model --help": ["minigpt", "inspect", "model", "--help"],
    "shell completion (bash, 'minigpt in')": ["minigpt"],
}
COMPLETION_ENV = {"_MINIGPT_COMPLETE": "complete_bash", "COMP_WORDS": "minigpt in",
                  "COMP_CWORD": "1"}
TARGET_S = 0.3
TARGET_SHARE = 0.25  # of `import torch`


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(cmd: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    import os

    full_env = {**os.environ, **(env or {})}
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False, env=full_env)
        if done.returncode != 0:  # a command that fails at once is no start-up time
            last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}"
                             + (f": {last}" if last else ""))
        if i:  # the first run warms the file cache
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="processes per command")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if shutil.which("minigpt") is None:
        print("minigpt is not on PATH: install it first (pip install -e .)", file=sys.stderr)
        return 1
    print(f"CPU: {cpu_name()} · Python {platform.python_version()} · median of {args.runs}")
    results = {}
    for label, cmd in COMMANDS.items():
        env = COMPLETION_ENV if label.startswith("shell completion") else None
        results[label] = median_seconds(cmd, args.runs, env)
    torch_s = results['python -c "import torch"']
    width = max(map(len, results))
    ok = True
    for label, seconds in results.items():
        mark = ""
        if label.startswith(("minigpt", "shell")):
            share = seconds / torch_s
            met = seconds <= TARGET_S and share <= TARGET_SHARE
            ok &= met
            mark = f"  {share:5.1%} of import torch  {'ok' if met else 'SLOWER THAN TARGET'}"
        print(f"{label:<{width}}  {seconds * 1000:7.0f} ms{mark}")
    print(f"target: each minigpt line <= {TARGET_S * 1000:.0f} ms and <= "
          f"{TARGET_SHARE:.0%} of `import torch` -> {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

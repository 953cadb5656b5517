"""Quality per second on tinyshakespeare, characters: nanoGPT's CPU recipe against the
``shakespeare-char`` preset, each timed as the whole ``minigpt train`` process and then
scored by ``minigpt eval`` (the whole validation split, non-overlapping windows).

    python benchmarks/shakespeare_char.py            # both
    python benchmarks/shakespeare_char.py --only preset
    python benchmarks/shakespeare_char.py --only preset --preset shakespeare-char-5min
    python benchmarks/shakespeare_char.py --set train.precision=fp32   # as an AVX2-only CPU

The recipe is nanoGPT's own, run by ``minigpt train`` (nanoGPT's train.py itself is not a
dependency); its figures on the same CPU are in the README for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR",
                             Path(__file__).resolve().parents[2] / "shared"))
TEXT = SHARED / "data" / "tinyshakespeare" / "input.txt"

# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides.
NANOGPT_CPU = [
    "--set", "tokenizer.spec=char", "--set", "model.max_seq_length=64",
    "--set", "model.embed_dim=128", "--set", "model.num_heads=4", "--set", "model.num_layers=4",
    "--set", "model.ff_dim=512", "--set", "model.dropout=0.0", "--set", "model.bias=false",
    "--set", "train.batch_size=12", "--set", "train.max_steps=2000",
    "--set", "train.learning_rate=1e-3", "--set", "train.min_lr_ratio=0.1",
    "--set", "train.warmup_steps=100", "--set", "train.beta2=0.99",
    "--set", "train.weight_decay=0.1", "--set", "train.grad_clip=1.0",
    "--set", "train.eval_interval=250", "--set", "train.eval_iters=20",
    "--set", "train.log_interval=10", "--set", "train.precision=fp32",
]


def minigpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd,
                          capture_output=True, text=True)


def trial(name: str, train_args: list[str], cwd: Path) -> dict:
    out = cwd / name
    start = time.perf_counter()
    result = minigpt("train", "--dataset", str(TEXT), "--out", str(out), *train_args, cwd=cwd)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{name}: train failed\n{result.stderr[-2000:]}")
    report = minigpt("eval", "--model", str(out), "--json", cwd=cwd)
    if report.returncode != 0:
        sys.exit(f"{name}: eval failed\n{report.stderr[-2000:]}")
    loss = json.loads(report.stdout)["loss"]
    return {"name": name, "wall_s": wall, "val_loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("recipe", "preset"))
    p.add_argument("--preset", default="shakespeare-char", help="the preset to time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the preset's run (repeatable)")
    args = p.parse_args()
    if not TEXT.is_file():
        sys.exit(f"tinyshakespeare not found at {TEXT} (set MINIGPT_SHARED_DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        env_cache = os.environ.setdefault("MINIGPT_CACHE_DIR", str(cwd / "cache"))
        # tokenize once, untimed, so neither trial pays for it
        minigpt("train", "--preset", "shakespeare-char", "--dataset", str(TEXT), "--out",
                str(cwd / "warm"), "--max-steps", "1", cwd=cwd)
        rows = []
        if args.only != "preset":
            rows.append(trial("nanogpt-cpu-recipe", ["--preset", "tiny", *NANOGPT_CPU], cwd))
        if args.only != "recipe":
            overrides = [x for item in args.set for x in ("--set", item)]
            rows.append(trial(args.preset, ["--preset", args.preset, *overrides], cwd))
        print(f"CPU: {machine.cpu()}; load average {machine.load()}")
        print(f"token cache: {env_cache}")
        print(f"{'run':<22}{'wall s':>8}{'val loss':>10}")
        for r in rows:
            print(f"{r['name']:<22}{r['wall_s']:>8.1f}{r['val_loss']:>10.4f}")
        if len(rows) == 2:
            ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
            print(f"time ratio {ratio:.2f}, "
                  f"val loss {rows[1]['val_loss'] - rows[0]['val_loss']:+.4f}")
            met = ratio <= 0.5 and rows[1]["val_loss"] <= rows[0]["val_loss"]
            print(f"target: at most half the recipe's wall time with a validation loss at least "
                  f"as good: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()

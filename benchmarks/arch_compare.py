"""Quality per second of the architecture variants: the same wall-clock budget for each, on
tinyshakespeare with characters and with GPT-2's BPE, validation bits per byte side by side.

Each trial is a whole ``minigpt train`` process with a cosine schedule that ends on time:
a short probe run measures the variant's seconds per step (and the process's start-up),
then the real run gets as many steps as fit in ``--budget`` seconds (at least 10).
``minigpt eval`` scores the whole validation split (the last 10% of the text,
non-overlapping windows). A second seed of one variant shows how much of a difference is
noise.

    python benchmarks/arch_compare.py                  # 240 s per trial
    python benchmarks/arch_compare.py --quick          # 20 s per trial, to see it work
    python benchmarks/arch_compare.py --budget 60 --only char
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

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR",
                             Path(__file__).resolve().parents[2] / "shared"))
TEXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"

# One shape for all (nanoGPT's CPU recipe's: 4 layers, 128 wide, 4 heads, context
# 64, no biases); only the architecture changes.
SHAPE = ["model.num_layers=4", "model.embed_dim=128", "model.num_heads=4",
         "model.max_seq_length=64", "model.dropout=0.0", "model.bias=false",
         "train.batch_size=24", "train.learning_rate=6e-3", "train.warmup_steps=50",
         "train.eval_interval=1000000", "train.checkpoint_interval=1000000",
         "train.eval_iters=1", "train.log_interval=5"]
GELU = ["model.ff_dim=512"]
SWIGLU = ["model.mlp=swiglu", "model.ff_dim=352"]  # 3 x 352 ~ 2 x 512 weights
VARIANTS = {
    "classic (GPT-2)": GELU,
    "classic + rope": ["model.position=rope", *GELU],
    "classic + rmsnorm + swiglu": ["model.norm=rmsnorm", *SWIGLU],
    "modern (rope, rmsnorm, swiglu, 2 kv heads)": [
        "model.position=rope", "model.norm=rmsnorm", "model.num_kv_heads=2", *SWIGLU],
}
NOISE_OF = "modern (rope, rmsnorm, swiglu, 2 kv heads)"
DATASETS = {"char": ["--tokenizer", "char"], "bpe": ["--tokenizer", f"tiktoken:{RANKS}"]}


def minigpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd,
                          capture_output=True, text=True)


def train(out: Path, dataset: str, settings: list[str], steps: int, seed: int,
          cwd: Path) -> float:
    """Seconds of the whole ``minigpt train`` process."""
    args = ["train", "--preset", "shakespeare-char", "--dataset", str(TEXT), "--out", str(out),
            *DATASETS[dataset], "--max-steps", str(steps), "--seed", str(seed)]
    for s in settings:
        args += ["--set", s]
    start = time.perf_counter()
    result = minigpt(*args, cwd=cwd)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{out.name}: train failed\n{result.stderr[-2000:]}")
    return wall


def trial(name: str, dataset: str, settings: list[str], budget: float, probe: int, seed: int,
          cwd: Path) -> dict:
    tag = f"{dataset}-{abs(hash(name)) % 10**6}-{seed}"
    # a probe run: the seconds per step after the first log line (from metrics.jsonl), and
    # whatever else the process spends (start-up, the final checkpoint) from its wall time
    probe_dir = cwd / f"{tag}-probe"
    wall = train(probe_dir, dataset, settings, probe, seed, cwd)
    lines = [json.loads(x) for x in (probe_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["elapsed"]) for r in lines if "elapsed" in r and "loss" in r]
    (s0, t0), (s1, t1) = logged[0], logged[-1]
    per_step = (t1 - t0) / max(s1 - s0, 1)
    fixed = max(wall - t1, 0.0)
    steps = max(10, int((budget - fixed) / per_step))
    out = cwd / f"{tag}-run"
    wall = train(out, dataset, settings, steps, seed, cwd)
    report = minigpt("eval", "--model", str(out), "--json", cwd=cwd)
    if report.returncode != 0:
        sys.exit(f"{name}: eval failed\n{report.stderr[-2000:]}")
    scores = json.loads(report.stdout)
    return {"variant": name, "dataset": dataset, "seed": seed, "steps": steps,
            "wall_s": wall, "bpb": scores["bits_per_byte"], "loss": scores["loss"]}


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, help="seconds of `minigpt train` per trial "
                   "(default 240, or 20 with --quick)")
    p.add_argument("--quick", action="store_true", help="short trials, to check it works")
    p.add_argument("--only", choices=tuple(DATASETS))
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args()
    budget = args.budget or (20.0 if args.quick else 240.0)
    probe = 15 if args.quick else 40
    if not TEXT.is_file():
        sys.exit(f"tinyshakespeare not found at {TEXT} (set MINIGPT_SHARED_DIR)")
    datasets = [d for d in DATASETS if args.only in (None, d)]
    if "bpe" in datasets and not RANKS.is_file():
        sys.exit(f"GPT-2 ranks not found at {RANKS}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        os.environ.setdefault("MINIGPT_CACHE_DIR", str(cwd / "cache"))
        for dataset in datasets:  # tokenize once, untimed
            train(cwd / f"warm-{dataset}", dataset, GELU, 1, 0, cwd)
        for dataset in datasets:
            for name, settings in VARIANTS.items():
                for seed in ((1337, 1) if name == NOISE_OF else (1337,)):
                    row = trial(name, dataset, [*SHAPE, *settings], budget, probe, seed, cwd)
                    rows.append(row)
                    print(f"  {dataset:<5} {name:<44} seed {seed:<5} {row['steps']:>6} steps "
                          f"{row['wall_s']:6.1f} s  {row['bpb']:.4f} bits/byte  (load {load()})",
                          file=sys.stderr, flush=True)
    print(f"\nvalidation bits per byte after about {budget:g} s of `minigpt train` each "
          f"(load average {load()} at the end)")
    head = f"{'variant':<46}" + "".join(f"{d + ' bpb':>11}{'steps':>7}" for d in datasets)
    print(head)
    for name in VARIANTS:
        line = f"{name:<46}"
        for d in datasets:
            r = next(r for r in rows if r["variant"] == name and r["dataset"] == d)
            line += f"{r['bpb']:>11.4f}{r['steps']:>7}"
        print(line)
    line = f"{'seed noise: ' + NOISE_OF.split(' ')[0] + ', second seed':<46}"
    for d in datasets:
        a, b = (r["bpb"] for r in rows if r["variant"] == NOISE_OF and r["dataset"] == d)
        line += f"{b - a:>+11.4f}{'':>7}"
    print(line)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Full fine-tuning against LoRA: peak memory and tokens/s of minigpt's training step.

For each model shape (the `small` preset's and GPT-2 124M's, random weights), full
fine-tuning and LoRA (rank 8 on every attention and MLP projection) run the trainer's own
step (AdamW, gradient clipping, fp32) on the same random tokens, each in its own process, so
that the peak resident memory (VmHWM, the RSS high-water mark) is that mode's alone. The memory
after building the model, before the first step, is printed too: the difference is what
training adds (gradients, optimizer state, activations).

    python benchmarks/lora.py                       # both shapes, 4 timed steps each
    python benchmarks/lora.py --models small --steps 10 --rank 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (model settings, batch size, context used)
    "small": (dict(vocab_size=50257, max_seq_length=128, embed_dim=256, num_heads=8,
                   num_layers=4, ff_dim=1024), 16, 128),
    "gpt2-124M": (dict(vocab_size=50257, max_seq_length=1024, embed_dim=768, num_heads=12,
                       num_layers=12, ff_dim=3072), 2, 256),
}


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(shape: str, rank: int, steps: int) -> dict:
    import numpy as np
    import torch

    from minigpt_cli.config import LoraConfig, ModelConfig, TrainConfig
    from minigpt_cli.device import select_precision
    from minigpt_cli.model import lora
    from minigpt_cli.model.gpt import GPT
    from minigpt_cli.train.trainer import Trainer

    settings, batch, ctx = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**settings, "max_seq_length": ctx}, dropout=0.0))
    if rank:
        lora.inject(model, LoraConfig(rank=rank, alpha=2.0 * rank))
    trainable, total = lora.count_parameters(model)
    tokens = np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16)
    cfg = TrainConfig(batch_size=batch, max_steps=steps + 1, device="cpu", precision="fp32",
                      warmup_steps=0)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, cfg, tokens, tokens[:10_000], ctx, device,
                          select_precision("fp32", device), Path(run_dir))
        before = rss_mib("VmRSS")
        trainer._train_step(1e-4)  # warm-up: allocates gradients and optimizer state
        start = time.perf_counter()
        for _ in range(steps):
            trainer._train_step(1e-4)
        seconds = time.perf_counter() - start
    return {"shape": shape, "mode": f"LoRA r{rank}" if rank else "full",
            "trainable": trainable, "total": total, "rss_before_mib": before,
            "peak_mib": rss_mib("VmHWM"), "tokens_per_sec": steps * batch * ctx / seconds,
            "tokens_per_step": batch * ctx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32; peak = VmHWM "
          "of the process")
    rows = []
    for shape in args.models.split(","):
        for rank in (0, args.rank):
            out = subprocess.run([sys.executable, __file__, "--worker", shape, str(rank),
                                  "--steps", str(args.steps)], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['shape']:>10} {r['mode']:>9}: {r['trainable']:>12,} trainable of "
                  f"{r['total']:,} | model built {r['rss_before_mib']:7.0f} MiB | peak "
                  f"{r['peak_mib']:7.0f} MiB | {r['tokens_per_sec']:7.0f} tokens/s "
                  f"({r['tokens_per_step']} tokens/step)", flush=True)
    print()
    for shape in args.models.split(","):
        full, low = (r for r in rows if r["shape"] == shape)
        print(f"{shape}: LoRA r{args.rank} peak {low['peak_mib'] / full['peak_mib']:.2f}x "
              f"of full fine-tuning's ({low['peak_mib'] - low['rss_before_mib']:.0f} vs "
              f"{full['peak_mib'] - full['rss_before_mib']:.0f} MiB added by training), "
              f"{low['tokens_per_sec'] / full['tokens_per_sec']:.2f}x its tokens/s")


if __name__ == "__main__":
    main()

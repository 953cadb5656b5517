"""The GPU benchmark: the ``gpt2`` preset (124M, context 1024) on synthetic tokens.

Prints, on one GPU, tokens/s, MFU against the data-sheet bf16 peak (``model/flops.py``) and
peak memory, eager and with ``torch.compile``; then the same step under DDP over all the
machine's GPUs (with one GPU it says so and skips it). No download: the tokens are random
ids, which cost the GPU exactly what text does. About 3-6 minutes in all on an H100/H200.

    python benchmarks/gpu.py                 # everything
    python benchmarks/gpu.py --steps 20      # shorter timing windows
    python benchmarks/gpu.py --skip-ddp      # one GPU only

The DDP part starts itself again under torchrun's launcher (``--nproc`` of the GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from minigpt_cli.config import Config
from minigpt_cli.device import configure_backends, select_precision
from minigpt_cli.model import flops
from minigpt_cli.model.gpt import GPT
from minigpt_cli.train import distributed


def bench(compile_: bool, steps: int, warmup: int, batch: int, accum: int) -> dict:
    """Time ``steps`` optimizer steps of the gpt2 preset (after ``warmup``); every rank of a
    DDP job runs this, and rank 0's figures are the job's (times the world size)."""
    cfg = Config.from_preset("gpt2")
    cfg.train.compile = compile_
    device = torch.device("cuda")
    info, device = distributed.init(device)
    precision = select_precision("bf16", device)
    configure_backends(device)
    torch.manual_seed(1337)
    model = GPT(cfg.model).to(device)
    distributed.broadcast_module(model)
    train_model = model.compile_for_training() if compile_ else model
    if info.enabled:
        train_model = distributed.wrap_ddp(train_model, device)
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=6e-4, betas=(0.9, 0.95),
                            fused=True)
    T, V = cfg.model.max_seq_length, cfg.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(info.rank)
    x = torch.randint(0, V, (batch, T), device=device, generator=gen)
    y = torch.randint(0, V, (batch, T), device=device, generator=gen)

    def step() -> None:
        for micro in range(accum):
            with distributed.sync_gradients(train_model, "ddp", micro == accum - 1):
                with precision.autocast(device):
                    _, loss = train_model(x, y)
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # includes compilation
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    distributed.barrier()
    seconds = time.perf_counter() - start
    tokens = steps * accum * batch * T * info.world_size
    rate = tokens / seconds
    peak = flops.peak_flops(device, precision)
    mfu = rate * flops.flops_per_token(model) / (peak * info.world_size) if peak else None
    return {"gpus": info.world_size, "name": torch.cuda.get_device_name(device),
            "tokens_per_sec": rate, "mfu": mfu,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "step_ms": seconds / steps * 1000}


def show(label: str, r: dict) -> None:
    mfu = "n/a (GPU not in model/flops.py)" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{label:<28} {r['tokens_per_sec']:>12,.0f} tokens/s   MFU {mfu:<8}  "
          f"peak memory {r['peak_mem_gib']:.1f} GiB   {r['step_ms']:.0f} ms/step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (and compile)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.ddp_worker:  # one rank of the DDP case
        r = bench(args.compile, args.steps, args.warmup, args.batch, args.accum)
        if distributed.is_main():
            show(f"DDP x{r['gpus']} (compile)" if args.compile else f"DDP x{r['gpus']}", r)
        distributed.cleanup()
        return

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (none is visible)")
    gpus = torch.cuda.device_count()
    print(f"gpt2 preset (124M, context 1024), bf16, batch {args.batch} x accum {args.accum}, "
          f"{args.steps} timed steps after {args.warmup}; {gpus} x "
          f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    began = time.perf_counter()
    show("1 GPU, eager", bench(False, args.steps, args.warmup, args.batch, args.accum))
    torch.cuda.empty_cache()
    show("1 GPU, --compile", bench(True, args.steps, args.warmup, args.batch, args.accum))
    if args.skip_ddp:
        pass
    elif gpus < 2:
        print("DDP: skipped, this machine has one GPU")
    else:
        argv = [os.path.abspath(__file__), "--ddp-worker", "--compile",
                "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--batch", str(args.batch), "--accum", str(args.accum)]
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=gpus,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                              run_id="gpu-bench", max_restarts=0)
        elastic_launch(config, entrypoint=sys.executable)(*argv)
    print(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

"""Training throughput: minigpt's training loop against a straightforward PyTorch GPT.

Both train the same model shape on the same tokens, each in its own process (so peak memory
is measured separately): the baseline is a plain GPT in fp32 with full logits and
``F.cross_entropy``; minigpt is ``minigpt train`` itself, read back from ``metrics.jsonl``.
It prints tokens/s, MFU against the matmul peak measured here, and peak memory (VmHWM).

    python benchmarks/train_speed.py                      # the `small` preset's model
    python benchmarks/train_speed.py --steps 60 --set train.precision=fp32
    python benchmarks/train_speed.py --loss-curve 300     # bf16 vs fp32 loss over 300 steps
"""

from __future__ import annotations

import argparse
import json
import math
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
TARGET_MFU = 0.70  # of the measured matmul peak of the precision in use


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- the straightforward baseline ---------------------------------------------------------

def baseline_worker(args) -> dict:
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    V, T, C, H, L, FF = args.vocab, args.ctx, args.width, args.heads, args.layers, args.ff

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc, self.out = nn.Linear(C, FF), nn.Linear(FF, C)
            self.drop = nn.Dropout(args.dropout)

        def forward(self, x):
            B, T_, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T_, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=args.dropout if self.training else 0)
            x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T_, C)))
            return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))

    class PlainGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.Sequential(*[Block() for _ in range(L)])
            self.ln_f, self.head = nn.LayerNorm(C), nn.Linear(C, V, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
            logits = self.head(self.ln_f(self.blocks(x)))
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = PlainGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    tokens = load_tokens(args)
    gen = torch.Generator().manual_seed(0)
    losses, times = [], []
    for _ in range(args.steps):
        ix = torch.randint(len(tokens) - T - 1, (args.batch,), generator=gen)
        x = torch.stack([tokens[i:i + T] for i in ix])
        y = torch.stack([tokens[i + 1:i + 1 + T] for i in ix])
        t = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    timed = times[args.warmup:]
    n = sum(p.numel() for p in model.parameters())
    return {"tokens_per_sec": args.batch * T * len(timed) / sum(timed), "params": n,
            "wpe": T * C, "peak_mib": peak_rss_mib(), "losses": losses}


def load_tokens(args):
    import numpy as np
    import torch

    if TEXT.is_file() and RANKS.is_file() and args.vocab == 50257:
        import minigpt_tokenizers

        tok = minigpt_tokenizers.create(f"tiktoken:{RANKS}")
        ids = tok.encode(TEXT.read_text(encoding="utf-8"))
        return torch.from_numpy(np.array(ids, dtype=np.int64))
    return torch.randint(args.vocab, (200_000,), generator=torch.Generator().manual_seed(0))


# ---- minigpt itself -----------------------------------------------------------------------

def minigpt_worker(args) -> dict:
    from minigpt_cli.cli.app import app

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cli = ["train", "--preset", args.preset, "--out", str(out), "--max-steps",
               str(args.steps), "--set", f"train.log_interval={args.log_interval}",
               "--set", "train.eval_interval=100000", "--set", "train.checkpoint_interval=100000",
               "--set", "train.eval_iters=1"]
        if TEXT.is_file() and RANKS.is_file():
            cli += ["--dataset", str(TEXT), "--tokenizer", f"tiktoken:{RANKS}"]
        for item in args.set or []:
            cli += ["--set", item]
        try:
            app(cli, standalone_mode=False)
        except SystemExit:
            pass
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        config = (out / "config.yaml").read_text()
    logged = [r for r in records if "tokens_per_sec" in r]
    skip = max(1, math.ceil(args.warmup / args.log_interval))
    rates = [r["tokens_per_sec"] for r in logged[skip:]] or [logged[-1]["tokens_per_sec"]]
    import yaml

    cfg = yaml.safe_load(config)
    m = cfg["model"]
    from minigpt_cli.config import ModelConfig
    from minigpt_cli.model.gpt import GPT

    n = GPT(ModelConfig(**m)).num_params()
    return {"tokens_per_sec": sum(rates) / len(rates), "params": n,
            "wpe": m["max_seq_length"] * m["embed_dim"], "peak_mib": peak_rss_mib(),
            "losses": [r["loss"] for r in logged], "precision": _precision(cfg),
            "model": m, "batch": cfg["train"]["batch_size"]}


def _precision(cfg: dict) -> str:
    import torch

    from minigpt_cli.device import select_precision

    return select_precision(cfg["train"]["precision"], torch.device("cpu")).name


# ---- driver ---------------------------------------------------------------------------------

def run_worker(kind: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--preset", args.preset,
           "--log-interval", str(args.log_interval), *extra]
    for item in args.set or []:
        cmd += ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_loss_curves(args) -> None:
    """minigpt in auto precision against fp32 with the same seed, and the noise floor: fp32
    against fp32 with another seed (other initial weights, batches and dropout masks)."""
    args.steps, args.log_interval = args.loss_curve, 1
    base_set = list(args.set or [])
    auto = run_worker("minigpt", args)
    args.set = [*base_set, "train.precision=fp32"]
    fp32 = run_worker("minigpt", args)
    args.set = [*base_set, "train.precision=fp32", "train.seed=1"]
    other = run_worker("minigpt", args)
    a, f, o = auto["losses"], fp32["losses"], other["losses"]
    n = min(len(a), len(f), len(o))
    print(f"loss over {n} steps: {auto['precision']} and fp32 (seed 0), fp32 (seed 1)")
    for s in range(0, n, max(1, n // 10)):
        print(f"  step {s + 1:>4}: {a[s]:.4f}  {f[s]:.4f}  {o[s]:.4f}")

    def mean_gap(x, y, part=slice(None)):
        pairs = list(zip(x[:n], y[:n], strict=True))[part]
        return sum(abs(p - q) for p, q in pairs) / len(pairs)

    last = slice(-50, None)
    print(f"mean |{auto['precision']} - fp32|, same seed:   {mean_gap(a, f):.4f} "
          f"(last 50 steps {mean_gap(a, f, last):.4f})")
    print(f"mean |fp32 - fp32|, other seed:  {mean_gap(f, o):.4f} "
          f"(last 50 steps {mean_gap(f, o, last):.4f})")
    print(f"mean loss, last 50 steps: {sum(a[last]) / len(a[last]):.4f}  "
          f"{sum(f[last]) / len(f[last]):.4f}  {sum(o[last]) / len(o[last]):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--set", action="append", help="override for the minigpt run")
    p.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                   help="instead: compare minigpt's loss in auto precision with fp32")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    for name, default in (("vocab", 50257), ("ctx", 128), ("width", 256), ("heads", 8),
                          ("layers", 4), ("ff", 1024), ("batch", 16)):
        p.add_argument(f"--{name}", type=int, default=default, help=argparse.SUPPRESS)
    p.add_argument("--dropout", type=float, default=0.1, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        worker = baseline_worker if args.worker == "baseline" else minigpt_worker
        print(json.dumps(worker(args)))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.loss_curve:
        compare_loss_curves(args)
        return

    from minigpt_cli.model.flops import measure_matmul_flops, transformer_flops_per_token

    cpu = torch.device("cpu")
    peaks = {name: measure_matmul_flops(cpu, dtype) / 1e9
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print("matmul peak here: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items()))
    mine = run_worker("minigpt", args)
    m = mine["model"]
    shape = ["--vocab", str(m["vocab_size"]), "--ctx", str(m["max_seq_length"]),
             "--width", str(m["embed_dim"]), "--heads", str(m["num_heads"]),
             "--layers", str(m["num_layers"]), "--ff", str(m["ff_dim"]),
             "--batch", str(mine["batch"]), "--dropout", str(m["dropout"])]
    base = run_worker("baseline", args, shape)
    print(f"model: {args.preset} preset ({mine['params']:,} parameters), batch {mine['batch']}, "
          f"context {m['max_seq_length']}, {args.steps} steps ({args.warmup} warm-up)")
    print(f"{'':<30}{'tokens/s':>10}{'MFU':>8}{'peak MiB':>10}")
    for name, r, prec in (("straightforward fp32", base, "fp32"),
                          (f"minigpt ({mine['precision']})", mine, mine["precision"])):
        fpt = transformer_flops_per_token(r["params"] - r["wpe"], m["num_layers"],
                                          m["max_seq_length"], m["embed_dim"])
        mfu = r["tokens_per_sec"] * fpt / (peaks[prec] * 1e9)
        print(f"{name:<30}{r['tokens_per_sec']:>10,.0f}{mfu:>8.1%}{r['peak_mib']:>10,.0f}")
    print(f"speed-up: {mine['tokens_per_sec'] / base['tokens_per_sec']:.2f}x")
    print(f"target: >= {TARGET_MFU:.0%} MFU of the {mine['precision']} matmul peak: "
          f"{'met' if mfu >= TARGET_MFU else 'NOT met'} ({mfu:.1%})")


if __name__ == "__main__":
    main()

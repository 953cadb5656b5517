"""Serving under load: 1, 4, 8 and 16 concurrent streaming clients of 200 tokens each.

Builds a run of the ``small`` preset's model (random weights; GPT-2's tokenizer from
../shared when it is there, else bytes), starts ``minigpt serve`` on it, and for each level
of concurrency prints aggregate tokens/s, per-stream tokens/s and p50/p95 time to first
token. ``minigpt generate``'s single-stream speed on the same run is measured in the same
run as the baseline. Targets: 8 streams' aggregate >= 3x one stream's, and one stream no
slower than ``generate``. Other processes on the machine make the figures noisy: the load
average is printed with them.

Usage: python benchmarks/serve_load.py [--preset small] [--tokens 200] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def make_run(root: Path, preset: str) -> Path:
    import torch

    import minigpt_tokenizers
    from minigpt_cli.config import Config
    from minigpt_cli.model.gpt import GPT
    from minigpt_cli.run import checkpoint, layout

    shared = os.environ.get("MINIGPT_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared"
    ranks = Path(shared) / "tokenizers" / "gpt2.tiktoken"
    tok = minigpt_tokenizers.create(f"tiktoken:{ranks}" if ranks.is_file() else "byte")
    cfg = Config.from_sources(preset)
    cfg.model.vocab_size = tok.vocab_size
    cfg.model.dropout = 0.0
    cfg.data.dataset = "benchmark"
    torch.manual_seed(0)
    run = root / preset
    layout.create_run_dir(run)
    layout.write_run_files(run, cfg, tok)
    checkpoint.save_checkpoint(run, 0, GPT(cfg.model), state={"best_val_loss": None},
                               training_tensors={}, best=True)
    return run


def engine_speed(run: Path, tokens: int) -> float:
    """``minigpt generate``'s engine in this process, warmed up (a fresh CLI process pays
    for its first steps too): the best of three."""
    import torch

    from minigpt_cli.generate.decoding import SamplingSettings
    from minigpt_cli.generate.engine import Engine, GenerationResult
    from minigpt_cli.run.load import load_run

    loaded = load_run(run, torch.device("cpu"))
    engine = Engine(loaded.model, loaded.tokenizer)
    best = 0.0
    for seed in range(3):
        settings = SamplingSettings(max_new_tokens=tokens, temperature=0.8, seed=seed)
        for event in engine.generate("Once upon a time", settings):
            if isinstance(event, GenerationResult):
                best = max(best, event.tokens_per_second)
    return best


def generate_speed(run: Path, tokens: int) -> float:
    out = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--model", str(run),
                          "--prompt", "Once upon a time", "--max-new-tokens", str(tokens),
                          "--device", "cpu", "--seed", "1", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["tokens_per_second"]


async def one_stream(client: httpx.AsyncClient, tokens: int, i: int) -> tuple[float, float, int]:
    body = {"prompt": f"Once upon a time {i}", "max_tokens": tokens, "temperature": 0.8,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, n = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, n


async def level(url: str, clients: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, tokens, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    total = sum(r[2] for r in results)
    return {"clients": clients, "aggregate": total / wall,
            "per_stream": statistics.mean(r[2] / (r[1] - r[0]) for r in results),
            "p50_ttft": statistics.median(ttfts),
            "p95_ttft": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--levels", default="1,4,8,16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.preset)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--model",
                                   str(run), "--port", str(port), "--device", "cpu",
                                   "--max-batch", str(args.max_batch)],
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            asyncio.run(level(url, 1, 16))  # warm-up
            print(f"{args.preset} preset, {args.tokens} tokens per stream, "
                  f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
            cli = generate_speed(run, args.tokens)
            base = engine_speed(run, args.tokens)
            print(f"minigpt generate (one stream): {cli:.1f} tokens/s as a fresh process, "
                  f"{base:.1f} tokens/s warmed up (its engine, in process)")
            rows = []
            for n in (int(x) for x in args.levels.split(",")):
                row = asyncio.run(level(url, n, args.tokens))
                rows.append(row)
                print(f"{n:3d} streams: aggregate {row['aggregate']:7.1f} tokens/s, per stream "
                      f"{row['per_stream']:6.1f} tokens/s, TTFT p50 {row['p50_ttft'] * 1000:6.0f}"
                      f" ms, p95 {row['p95_ttft'] * 1000:6.0f} ms")
            one = rows[0]["aggregate"]
            eight = next((r["aggregate"] for r in rows if r["clients"] == 8), None)
            if eight:
                print(f"8 streams / 1 stream: {eight / one:.2f}x (target >= 3x); "
                      f"1 stream / generate: {rows[0]['per_stream'] / base:.2f}x (target >= 1)")
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()

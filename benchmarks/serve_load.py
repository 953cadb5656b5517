"""Serving under load: 1, 4, 8 and 16 concurrent streaming clients of 200 tokens each.

Builds a run of the ``small`` preset's model (random weights; GPT-2's tokenizer from
../shared when it is there, else bytes), starts ``minigpt serve`` on it, and for each level
of concurrency prints aggregate tokens/s, per-stream tokens/s and p50/p95 time to first
token. ``minigpt generate``'s single-stream speed on the same run is measured in the same
run as the baseline (its engine warmed up in this process). Each round times the baseline
and then every level, so that the slower spells of a shared machine fall on all of them
alike; each figure is the best of ``--rounds``. Targets: 8 streams' aggregate >= 3x one
stream's, and one stream no slower than ``generate``.

The clients share the machine with the server. By default they read the streams over bare
sockets and parse only the final usage event, so they cost the server's CPU next to
nothing, as clients on other machines would; ``--client httpx`` parses every event with
httpx instead (about 0.2-0.5 ms of CPU per token on a 2-core machine). Other processes on
the machine make the figures noisy: the CPU and the load average are printed with them.

Usage: python benchmarks/serve_load.py [--preset small] [--tokens 200] [--max-batch 16]
       [--rounds 3] [--client raw|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
import machine  # benchmarks/machine.py, beside this script


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


def engine_speed(run: Path, tokens: int):
    """``minigpt generate``'s engine in this process, warmed up (a fresh CLI process pays
    for its first steps too): a function that times one call, in tokens/s."""
    import torch

    from minigpt_cli.device import configure_backends
    from minigpt_cli.generate.decoding import SamplingSettings
    from minigpt_cli.generate.engine import Engine, GenerationResult
    from minigpt_cli.run.load import load_run

    configure_backends(torch.device("cpu"))  # as the command does
    loaded = load_run(run, torch.device("cpu"))
    engine = Engine(loaded.model, loaded.tokenizer)
    calls = itertools.count()

    def one_call() -> float:
        settings = SamplingSettings(max_new_tokens=tokens, temperature=0.8, seed=next(calls))
        for event in engine.generate("Once upon a time", settings):
            if isinstance(event, GenerationResult):
                return event.tokens_per_second
        raise RuntimeError("no result")

    one_call()  # warm-up
    return one_call


def generate_speed(run: Path, tokens: int) -> float:
    out = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--model", str(run),
                          "--prompt", "Once upon a time", "--max-new-tokens", str(tokens),
                          "--device", "cpu", "--seed", "1", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["tokens_per_second"]


async def one_stream(client: httpx.AsyncClient, tokens: int, i: int) -> tuple[float, float, int]:
    """One streaming completion through httpx: (time to first token, seconds, tokens)."""
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


async def one_raw_stream(url: str, tokens: int, i: int) -> tuple[float, float, int]:
    """The same request over a bare socket, reading the bytes as they come and parsing only
    the final usage event: a client that costs the shared CPU almost nothing, as one on
    another machine would."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": f"Once upon a time {i}", "max_tokens": tokens,
                       "temperature": 0.8, "seed": i, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (host.encode(), len(body), body))
    status = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise RuntimeError(f"stream {i}: {status.decode()}")
    ttft, parts = None, []
    while data := await reader.read(1 << 16):
        if ttft is None and b'"choices": [{' in data:
            ttft = time.perf_counter() - t0
        parts.append(data)
    elapsed = time.perf_counter() - t0
    writer.close()
    usage = next(line for line in b"".join(parts).split(b"\n")
                 if line.startswith(b"data: {") and b'"usage"' in line)
    return ttft or 0.0, elapsed, json.loads(usage[6:])["usage"]["completion_tokens"]


async def level(url: str, clients: int, tokens: int, raw: bool = True) -> dict:
    t0 = time.perf_counter()
    if raw:
        results = await asyncio.gather(*(one_raw_stream(url, tokens, i) for i in range(clients)))
    else:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            results = await asyncio.gather(*(one_stream(client, tokens, i)
                                             for i in range(clients)))
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
    ap.add_argument("--rounds", type=int, default=3, help="runs of each level; the best counts")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="raw: a bare-socket client that costs the shared CPU almost nothing "
                         "(default); httpx: parse every event, as a Python client does")
    ap.add_argument("--stream-interval", type=float, default=None,
                    help="the server's --stream-interval (default: its own default)")
    args = ap.parse_args()
    extra = [] if args.stream_interval is None else ["--stream-interval",
                                                     str(args.stream_interval)]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.preset)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--model",
                                   str(run), "--port", str(port), "--device", "cpu",
                                   "--max-batch", str(args.max_batch), *extra],
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
            print(f"{args.preset} preset, {args.tokens} tokens per stream, {args.client} "
                  f"clients, best of {args.rounds} rounds, load average {machine.load()}"
                  + (f", --stream-interval {args.stream_interval}" if extra else ""))
            print(f"CPU: {machine.cpu()}")
            cli = generate_speed(run, args.tokens)
            engine = engine_speed(run, args.tokens)
            levels = [int(x) for x in args.levels.split(",")]
            bases, runs = [], {n: [] for n in levels}
            for _ in range(args.rounds):  # interleaved, so that a slower spell hits them all
                bases.append(engine())
                for n in levels:
                    runs[n].append(asyncio.run(level(url, n, args.tokens, args.client == "raw")))
            base = max(bases)
            print(f"minigpt generate (one stream): {cli:.1f} tokens/s as a fresh process, "
                  f"{base:.1f} tokens/s warmed up (its engine, in process)")
            rows = [max(runs[n], key=lambda r: r["aggregate"]) for n in levels]
            for n, row in zip(levels, rows, strict=True):
                print(f"{n:3d} streams: aggregate {row['aggregate']:7.1f} tokens/s, per stream "
                      f"{row['per_stream']:6.1f} tokens/s, TTFT p50 {row['p50_ttft'] * 1000:6.0f}"
                      f" ms, p95 {row['p95_ttft'] * 1000:6.0f} ms")
            one = rows[0]["aggregate"]
            eight = next((r["aggregate"] for r in rows if r["clients"] == 8), None)
            if eight:
                print(f"8 streams / 1 stream: {eight / one:.2f}x (target >= 3x); "
                      f"1 stream / generate: {rows[0]['per_stream'] / base:.2f}x (target >= 1)")
            if levels[0] == 1:
                ratios = sorted(r["per_stream"] / b for r, b in zip(runs[1], bases, strict=True))
                print("1 stream / generate, round by round: "
                      + ", ".join(f"{x:.2f}" for x in ratios)
                      + f" (median {statistics.median(ratios):.2f}x)")
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()

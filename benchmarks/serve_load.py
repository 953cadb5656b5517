"""Serving under load: 1, 4, 8 and 16 concurrent streaming clients of 200 tokens each.

Builds a run of the ``small`` preset's model (random weights; GPT-2's tokenizer from
../shared when it is there, else bytes), starts ``minigpt serve`` on it, and for each level
of concurrency prints aggregate tokens/s, per-stream tokens/s and p50/p95 time to first
token. The baseline is ``minigpt generate`` on the same run, timed in every round three
ways: as a user runs it (a fresh process streaming its text to a terminal, as the server
streams to its client), with ``--json`` (a fresh process that writes nothing until it is
done, which a stream cannot do), and its engine warmed up in this process (no output
either, and without the first steps that a fresh process pays for). Each round times the
baselines and then every level, so that the slower spells of a shared machine fall on all
of them alike; the table gives the best of ``--rounds``, the one-stream ratios are round
by round. Each round starts a fresh server, as ``generate`` is a fresh process. Speeds are
decoding speeds, the tokens after the first over the time after it, for the streams as
for ``generate``: neither pays for its start (a connection, a prefill) in them. Targets: 8
streams' aggregate >= 3x one stream's, and one stream no slower than ``generate`` as a
user runs it; the other two ratios are printed beside it.

The clients share the machine with the server, which a remote client would not. By
default each stream is a ``curl`` process, which costs the server's CPU least: a wake-up of
microseconds per chunk, and its own timings. ``--client raw`` reads the streams over bare
sockets in this process's event loop instead (a Python wake-up per chunk, 2-5% of one
stream's speed on a 2-core machine), and ``--client httpx`` parses every event with httpx
(about 0.2-0.5 ms of CPU per token). Other processes on the machine make the figures
noisy: the CPU and the load average are printed with them.

Usage: python benchmarks/serve_load.py [--preset small] [--tokens 200] [--max-batch 16]
       [--rounds 3] [--client curl|raw|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
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


def decode_speed(tokens: int, elapsed: float, ttft: float) -> float:
    """Tokens/s once the first token is out: the tokens after it over the time after it.
    Every figure here is this, for the server's streams as for ``minigpt generate``, so
    that neither counts its start-up (a prefill, a connection) against the other."""
    return (tokens - 1) / (elapsed - ttft) if tokens > 1 and elapsed > ttft else 0.0


def engine_speed(run: Path, tokens: int):
    """``minigpt generate``'s engine in this process, warmed up (a fresh CLI process pays
    for its first steps too): a function that times one call (``decode_speed``)."""
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
                return decode_speed(event.generated_tokens, event.elapsed,
                                    event.time_to_first_token)
        raise RuntimeError("no result")

    one_call()  # warm-up
    return one_call


def generate_speed(run: Path, tokens: int, seed: int) -> float:
    """``minigpt generate --json``, a fresh process that writes nothing until it is done
    (``decode_speed``)."""
    out = subprocess.run(_generate_command(run, tokens, seed) + ["--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return decode_speed(result["generated_tokens"], result["elapsed_s"],
                        result["time_to_first_token_s"])


def generate_on_terminal(run: Path, tokens: int, seed: int) -> float:
    """``minigpt generate`` as a user runs it: a fresh process streaming its text to a
    terminal, here a pseudo-terminal that this process reads as a terminal emulator
    would, without drawing. The speed comes from the line it ends with (``decode_speed``:
    its elapsed time as tokens over tokens/s, which has more digits than its seconds)."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(_generate_command(run, tokens, seed), stdin=follower,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    out = bytearray()
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # EIO: the process is gone and the terminal closed
            break
        if not data:
            break
        out += data
    os.close(leader)
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out).decode(errors="replace")
    stats = re.search(r"(\d+) tokens in [\d.]+ s . ([\d.]+) tokens/s . first token (\d+) ms",
                      text)
    if proc.wait() or stats is None:
        raise RuntimeError(f"minigpt generate on a terminal failed: {text[-500:]}")
    n, rate = int(stats[1]), float(stats[2])
    return decode_speed(n, n / rate, int(stats[3]) / 1000)


def _generate_command(run: Path, tokens: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "minigpt_cli", "generate", "--model", str(run), "--prompt",
            "Once upon a time", "--max-new-tokens", str(tokens), "--device", "cpu", "--seed",
            str(seed)]


def _body(tokens: int, i: int) -> dict:
    """Stream i's request: a streamed completion of ``tokens`` tokens, with its usage."""
    return {"prompt": f"Once upon a time {i}", "max_tokens": tokens, "temperature": 0.8,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}


async def one_stream(client: httpx.AsyncClient, tokens: int, i: int) -> tuple[float, float, int]:
    """One streaming completion through httpx: (time to first token, seconds, tokens)."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    async with client.stream("POST", "/v1/completions", json=_body(tokens, i)) as r:
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


def completion_tokens(lines: list[bytes], i: int) -> int:
    """The completion tokens of a stream's final usage event (the last one that has it)."""
    for line in reversed(lines):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                return event["usage"]["completion_tokens"]
            if "error" in event:
                raise RuntimeError(f"stream {i}: {event['error']['message']}")
    raise RuntimeError(f"stream {i}: no usage event")


async def one_raw_stream(url: str, tokens: int, i: int) -> tuple[float, float, int]:
    """The same request over a bare socket, reading the bytes as they come and parsing only
    the final usage event: a client that costs the shared CPU almost nothing, as one on
    another machine would."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(_body(tokens, i)).encode()
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
    return ttft or 0.0, elapsed, completion_tokens(b"".join(parts).split(b"\n"), i)


async def one_curl_stream(url: str, tokens: int, i: int) -> tuple[float, float, int]:
    """The same request through curl, a C program that costs the shared CPU least of all
    (one wake-up of a few microseconds per chunk): its own timings, first byte and end.
    It writes the stream to a file, read when it is done: only curl wakes up for each
    chunk, as only the terminal does for ``generate``'s writes, and not this process too."""
    fd, path = tempfile.mkstemp(prefix="serve_load_")
    os.close(fd)
    try:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sSN", "--fail", "-H", "Content-Type: application/json",
            "--data-binary", "@-", "-o", path, "-w", "%{time_starttransfer} %{time_total}",
            f"{url}/v1/completions", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(json.dumps(_body(tokens, i)).encode())
        if proc.returncode:
            raise RuntimeError(f"stream {i}: curl: {err.decode().strip()}")
        first, total = map(float, out.split())
        lines = Path(path).read_bytes().split(b"\n")
    finally:
        os.unlink(path)
    return first, total, completion_tokens(lines, i)


async def level(url: str, clients: int, tokens: int, client: str = "raw") -> dict:
    t0 = time.perf_counter()
    if client in ("raw", "curl"):
        one = one_raw_stream if client == "raw" else one_curl_stream
        results = await asyncio.gather(*(one(url, tokens, i) for i in range(clients)))
    else:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            results = await asyncio.gather(*(one_stream(http, tokens, i)
                                             for i in range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    total = sum(r[2] for r in results)
    return {"clients": clients, "aggregate": total / wall,
            "per_stream": statistics.mean(decode_speed(r[2], r[1], r[0]) for r in results),
            "p50_ttft": statistics.median(ttfts),
            "p95_ttft": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def _ratios(streams: list[dict], bases: list[float]) -> str:
    ratios = sorted(r["per_stream"] / b for r, b in zip(streams, bases, strict=True))
    return (", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {statistics.median(ratios):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each level; the best counts")
    ap.add_argument("--client", choices=("curl", "raw", "httpx"),
                    default="curl" if shutil.which("curl") else "raw",
                    help="curl: one curl process per stream, which costs the shared CPU least "
                         "(default where curl is installed); raw: a bare-socket client in "
                         "this process (a Python wake-up per chunk); httpx: parse every "
                         "event, as a Python client does")
    ap.add_argument("--stream-interval", type=float, default=None,
                    help="the server's --stream-interval (default: its own default)")
    args = ap.parse_args()
    extra = [] if args.stream_interval is None else ["--stream-interval",
                                                     str(args.stream_interval)]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.preset)
        print(f"{args.preset} preset, {args.tokens} tokens per stream, {args.client} "
              f"clients, best of {args.rounds} rounds, load average {machine.load()}"
              + (f", --stream-interval {args.stream_interval}" if extra else ""))
        print(f"CPU: {machine.cpu()}")
        print("Speeds are decoding speeds: the tokens after the first over the time after "
              "it, for the streams as for generate.")
        engine = engine_speed(run, args.tokens)
        levels = [int(x) for x in args.levels.split(",")]
        clis, jsons, warm, runs = [], [], [], {n: [] for n in levels}
        for r in range(args.rounds):  # interleaved, so that a slower spell hits them all
            clis.append(generate_on_terminal(run, args.tokens, seed=r))
            jsons.append(generate_speed(run, args.tokens, seed=r))
            warm.append(engine())
            with server_process(run, args.max_batch, extra) as url:
                for n in levels:
                    runs[n].append(asyncio.run(level(url, n, args.tokens, args.client)))
        print(f"minigpt generate (one stream): {max(clis):.1f} tokens/s streaming to a "
              f"terminal (as a user runs it), {max(jsons):.1f} with --json (no output until "
              f"the end), {max(warm):.1f} warmed up (its engine, in this process)")
        rows = [max(runs[n], key=lambda r: r["aggregate"]) for n in levels]
        for n, row in zip(levels, rows, strict=True):
            print(f"{n:3d} streams: aggregate {row['aggregate']:7.1f} tokens/s, per stream "
                  f"{row['per_stream']:6.1f} tokens/s, TTFT p50 {row['p50_ttft'] * 1000:6.0f}"
                  f" ms, p95 {row['p95_ttft'] * 1000:6.0f} ms")
        one = rows[0]["aggregate"]
        eight = next((r["aggregate"] for r in rows if r["clients"] == 8), None)
        if eight:
            print(f"8 streams / 1 stream: {eight / one:.2f}x (target >= 3x)")
        if levels[0] == 1:
            print("1 stream / minigpt generate on a terminal, round by round (target >= 1): "
                  + _ratios(runs[1], clis))
            print("1 stream / minigpt generate --json, round by round: "
                  + _ratios(runs[1], jsons))
            print("1 stream / generate's engine warmed up in process, round by round: "
                  + _ratios(runs[1], warm))
        print(f"load average after: {os.getloadavg()[0]:.2f}")


@contextlib.contextmanager
def server_process(run: Path, max_batch: int, extra: list[str]):
    """A ``minigpt serve`` process on ``run``, up and warmed up: its URL. A fresh one each
    round, as ``generate`` is: how fast a process decodes varies from process to process
    on a shared machine (where its memory lands), and this spreads that over both alike."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--model",
                               str(run), "--port", str(port), "--device", "cpu",
                               "--max-batch", str(max_batch), *extra],
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(level(url, 1, 16, "raw"))  # warm-up
        yield url
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()

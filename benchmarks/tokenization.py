"""Tokenization speed: building the token cache against one single-threaded encode.

Makes a text of ``--mb`` MB (100 by default) in a temporary folder by repeating the shared
corpora (tiny shakespeare, WikiText-2 valid and test), then encodes it two ways:

- baseline:  tiktoken's ``encode_ordinary`` over the whole text, one call, one thread
- minigpt:   ``token_cache`` as ``minigpt train`` and ``eval`` build it (safe cuts, batches
             over tiktoken's threads, counting while encoding, ids written to disk)

and checks that both give the same ids. ``--sentencepiece`` does the same for a
SentencePiece BPE model of 8,000 pieces trained on the first 2 MB (its baseline: one
thread). Nothing is written outside the temporary folder. Other processes on the machine
make the figures noisy: the load average is printed with them.

Usage: python benchmarks/tokenization.py [--mb 100] [--sentencepiece]

(Not ``tokenize.py``: a script's folder comes first on ``sys.path``, so that name would
stand in for the standard library's ``tokenize`` in every benchmark here.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script
import numpy as np

import minigpt_tokenizers
from minigpt_cli.data.files import FileSource, Segment
from minigpt_cli.data.token_cache import token_cache

TARGET_MB_S = 45
SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
CORPORA = ("data/tinyshakespeare/input.txt", "data/wikitext-2/valid.txt",
           "data/wikitext-2/test.txt")


def make_text(folder: Path, mb: int) -> Path:
    missing = [rel for rel in CORPORA if not (SHARED / rel).is_file()]
    if missing:
        sys.exit(f"shared corpora not found under {SHARED} (set MINIGPT_SHARED_DIR)")
    blob = b"".join((SHARED / rel).read_bytes() for rel in CORPORA)
    size = mb * 1_000_000
    data = (blob * (size // len(blob) + 1))[:size]
    data = data[:data.rfind(b"\n") + 1]  # whole lines, whole characters
    path = folder / "text.txt"
    path.write_bytes(data)
    return path


def timed(encode) -> tuple[np.ndarray, float]:
    """The ids of ``encode()`` and its time. The ids are kept as an array: tens of millions
    of Python ints left alive would slow down the run measured after it by about 10%."""
    t0 = time.perf_counter()
    ids = encode()
    secs = time.perf_counter() - t0
    return np.asarray(ids, dtype=np.uint32), secs


def through_cache(path: Path, tok, cache: Path) -> tuple[np.ndarray, float]:
    source = FileSource(str(path), {"train": [Segment(path, 0, path.stat().st_size)]})
    t0 = time.perf_counter()
    arr = token_cache(source, "train", tok, cache)
    return np.asarray(arr.tokens), time.perf_counter() - t0


def report(name: str, size: int, baseline: tuple[np.ndarray, float],
           ours: tuple[np.ndarray, float]) -> float:
    """Print one tokenizer's figures; return the token cache's MB/s."""
    base_ids, base_s = baseline
    ids, secs = ours
    mb = size / 1e6
    same = np.array_equal(ids, base_ids)
    print(f"{name}: baseline (one encode, 1 thread) {mb / base_s:6.1f} MB/s ({base_s:.1f} s); "
          f"token cache {mb / secs:6.1f} MB/s ({secs:.1f} s), {secs and base_s / secs:.2f}x; "
          f"ids identical: {'yes' if same else 'NO'}; {len(ids):,} tokens")
    return mb / secs if same else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--sentencepiece", action="store_true")
    args = ap.parse_args()
    if args.mb < 1:
        ap.error(f"--mb must be at least 1, got {args.mb}")
    ranks = SHARED / "tokenizers" / "gpt2.tiktoken"
    if not ranks.is_file():
        sys.exit(f"{ranks} not found (set MINIGPT_SHARED_DIR)")
    print(f"CPU: {machine.cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = make_text(folder, args.mb)
        size = path.stat().st_size
        text = path.read_text(encoding="utf-8")
        print(f"text: {size / 1e6:.0f} MB of repeated shared corpora; load before: "
              f"{machine.load()}")
        tok = minigpt_tokenizers.create(f"tiktoken:{ranks}")
        baseline = timed(lambda: tok.enc.encode_ordinary(text))
        ours = through_cache(path, tok, folder / "cache")
        gpt2 = report("GPT-2 BPE (tiktoken)", size, baseline, ours)
        if args.sentencepiece:
            from minigpt_tokenizers import sentencepiece_model as spm_plugin

            sp = minigpt_tokenizers.create("sentencepiece:bpe:8000",
                                           lambda: iter([text[:2_000_000]]))
            threads = spm_plugin.ENCODE_THREADS
            spm_plugin.ENCODE_THREADS = 1
            baseline = timed(lambda: sp.encode(text))
            spm_plugin.ENCODE_THREADS = threads
            report("SentencePiece BPE 8k", size, baseline, through_cache(path, sp, folder / "sp"))
        print(f"load after: {machine.load()}")
        met = "met" if gpt2 >= TARGET_MB_S else "NOT met"
        print(f"target: GPT-2 BPE token cache at >= {TARGET_MB_S} MB/s on 2 cores: {met} "
              f"({gpt2:.1f} MB/s with identical ids, {os.cpu_count()} CPUs here)")


if __name__ == "__main__":
    main()

"""Sampling speed: the KV-cached engine against a full forward per token.

Builds the original design's model (vocab 50257, 4 layers, 256 wide, 8 heads, context 128)
with random weights and samples the same number of tokens three ways, batch 1:

- engine:        minigpt_cli.generate.engine.Engine (prefill once, one cached step per
                 token, sliding window past the context), fp32 with its int8 decoding head
                 for sampling, then with an exact fp32 head, then with the whole model
                 quantised by ``quantize_model`` (``--quantize int8`` and ``int4``)
- nanoGPT way:   the straightforward way, as nanoGPT samples: crop to the context, a full
                 forward over it for every new token, the head on the last position only
- all logits:    the same, with this model's forward, which computes the logits of every
                 position (slower still; for reference)

The speed-up that counts is the engine's over the nanoGPT way: with ``--rounds``, of the best
figures and, round by round, of the figures of one round. Other processes on the machine
make the figures noisy: the load average is printed with them.

Usage: python benchmarks/sampling.py [--tokens 500] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script
import torch
from torch.nn import functional as F

from minigpt_cli.config import ModelConfig
from minigpt_cli.generate.decoding import SamplingSettings, sample_next
from minigpt_cli.generate.engine import Engine, GenerationResult
from minigpt_cli.generate.quant import QUANTIZE_MODES, quantize_model
from minigpt_cli.model.gpt import GPT

TARGET_SPEEDUP = 5.0  # the engine against the nanoGPT way, batch 1
TARGET_FIRST_S = 0.010  # the engine's first token
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


class StubTokenizer:
    """Stands in for GPT-2's tokenizer when shared/tokenizers/gpt2.tiktoken is absent."""

    vocab_size, eot_id = 50257, 50256

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        return b"".join(b"<%d>" % i for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def gpt2_tokenizer():
    shared = os.environ.get("MINIGPT_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared"
    ranks = Path(shared) / "tokenizers" / "gpt2.tiktoken"
    if not ranks.is_file():
        return StubTokenizer(), "stub (gpt2.tiktoken not found)"
    import minigpt_tokenizers

    return minigpt_tokenizers.create(f"tiktoken:{ranks}"), "tiktoken GPT-2"


def run_engine(model, tok, settings, device, exact_head=False, setup=0.0):
    """Tokens, seconds and first-token seconds of one generate call, and the set-up
    (making the engine; ``setup`` seconds more for quantising the model) apart."""
    t0 = time.perf_counter()
    engine = Engine(model, tok, device, exact_head=exact_head)
    setup += time.perf_counter() - t0
    for ev in engine.generate(PROMPT, settings):
        if isinstance(ev, GenerationResult):
            return ev.generated_tokens, ev.elapsed, ev.time_to_first_token, setup


@torch.inference_mode()
def run_full_forward(model, tok, settings, device, last_only: bool):
    """Sample like nanoGPT: crop to the context, forward it all, sample from the last row."""
    t0 = time.perf_counter()
    ctx = model.config.max_seq_length
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    idx = torch.tensor([tok.encode(PROMPT)], device=device)
    ttft, n = None, 0
    for _ in range(settings.max_new_tokens):
        if last_only:  # nanoGPT's forward at inference: the head on the last position only
            x = model.features(idx[:, -ctx:])  # (1, T, C)
            logits = F.linear(x[:, -1], model.lm_head.weight)  # (1, V)
        else:
            logits = model(idx[:, -ctx:])[0][:, -1]
        nxt = sample_next(logits, settings, gen)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        token = nxt.item()
        tok.decode_bytes([token])
        n += 1
        if ttft is None:
            ttft = time.perf_counter() - t0
        if token == tok.eot_id:
            break
    return n, time.perf_counter() - t0, ttft, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every way this many times, in turn, and keep each one's best "
                         "(on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, dropout=0.0)).to(device).eval()
    # the engine lays its model out for decoding, in place: the full forwards and the
    # quantised copies take a plain twin, as a model fresh from a checkpoint is
    plain = copy.deepcopy(model)
    tok, tok_name = gpt2_tokenizer()
    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=args.temperature,
                                seed=1234)
    warm = SamplingSettings(max_new_tokens=20, temperature=args.temperature, seed=1)
    print(f"model: {model.num_params() / 1e6:.1f}M params, vocab 50257, 4x256, context 128; "
          f"decoding head {Engine(model, tok, device).head.mode}; "
          f"tokenizer {tok_name}; device {device}, {torch.get_num_threads()} threads; "
          f"{args.tokens} new tokens, batch 1, temperature {args.temperature}")
    print(f"CPU: {machine.cpu()}; {machine.torch_level()}")
    print(f"load average before: {load()}")

    quantized = {}  # mode -> (model, seconds quantize_model took)
    for mode in QUANTIZE_MODES if device.type == "cpu" else ():
        copied = copy.deepcopy(plain)
        t0 = time.perf_counter()
        quantized[mode] = quantize_model(copied, mode), time.perf_counter() - t0
    ways = {
        "engine (KV cache)": lambda s: run_engine(model, tok, s, device),
        "engine, exact fp32 head": lambda s: run_engine(model, tok, s, device, True),
        **{f"engine, --quantize {mode}": (lambda s, m=m, q=q: run_engine(m, tok, s, device,
                                                                          setup=q))
           for mode, (m, q) in quantized.items()},
        "nanoGPT way (full forward)": lambda s: run_full_forward(plain, tok, s, device, True),
        "all logits (full forward)": lambda s: run_full_forward(plain, tok, s, device, False),
    }
    rates, firsts, ratios = {}, {}, []
    for fn in ways.values():
        fn(warm)
    for r in range(args.rounds):
        for name, fn in ways.items():
            n, secs, ttft, setup = fn(settings)
            rates[name] = max(rates.get(name, 0.0), n / secs)
            firsts[name] = min(firsts.get(name, ttft), ttft)
            print(f"{name:28s} {n:4d} tokens  {n / secs:8.1f} tokens/s  "
                  f"first token {ttft * 1000:6.1f} ms  total {secs:6.2f} s  "
                  f"set-up {setup * 1000:5.0f} ms"
                  + (f"  (round {r + 1})" if args.rounds > 1 else ""))
            if name == "engine (KV cache)":
                engine_rate = n / secs
            elif name == "nanoGPT way (full forward)":
                ratios.append(engine_rate / (n / secs))
    if args.rounds > 1:
        print(f"best of {args.rounds} rounds:")
        for name, rate in rates.items():
            print(f"{name:28s} {rate:8.1f} tokens/s  first token {firsts[name] * 1000:6.1f} ms")
    engine = rates["engine (KV cache)"]
    base = rates["nanoGPT way (full forward)"]
    print(f"load average after: {load()}")
    print(f"speed-up of the engine: {engine / base:.1f}x over the "
          f"nanoGPT way (the target is 5x), {engine / rates['all logits (full forward)']:.1f}x "
          "over all logits")
    if args.rounds > 1:  # each round's own ratio: a slower spell of the machine hits both
        print("speed-up round by round: " + ", ".join(f"{x:.1f}x" for x in sorted(ratios))
              + f" (median {statistics.median(ratios):.1f}x)")
    for name, rate in rates.items():
        if "quantize" in name:
            print(f"{name}: {rate / base:.1f}x the nanoGPT way, {rate / engine:.2f}x the fp32 "
                  "engine")
    first = firsts["engine (KV cache)"]
    met = engine / base >= TARGET_SPEEDUP and first <= TARGET_FIRST_S
    print(f"target: the engine >= {TARGET_SPEEDUP:g}x the nanoGPT way (best round) and first "
          f"token <= {TARGET_FIRST_S * 1000:.0f} ms: {'met' if met else 'NOT met'} "
          f"({engine / base:.1f}x, {first * 1000:.1f} ms)")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()

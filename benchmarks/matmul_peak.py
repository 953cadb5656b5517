"""The matmul peak that MFU is measured against on the CPU, in fp32 and bf16.

``minigpt_cli.model.flops.measure_matmul_flops`` is what training divides by on a CPU
(``train_speed.py`` prints the same figure before its runs); this prints it alone, for the
default shape and a small one. A figure, not a test: the tests only check that a positive
finite number comes back.

    python benchmarks/matmul_peak.py [--threads N] [--repeats 10]
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs; the best counts")
    args = parser.parse_args()

    import torch

    from minigpt_cli.model.flops import measure_matmul_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cpu = torch.device("cpu")
    for shape in ((2048, 1024, 1024), (64, 64, 64)):
        peaks = {name: measure_matmul_flops(cpu, dtype, shape, args.repeats) / 1e9
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        label = " x ".join(map(str, shape))
        print(f"matmul peak ({label}): "
              + ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in peaks.items()))


if __name__ == "__main__":
    main()

"""Time one DP step's noise for a model's trainable parameters: dpdit's secret AES-CTR
streams against torch's generator (Opacus' default) and Opacus' secure_mode draw (four
normals per value). Median of several runs.

    python scripts/benchmark_noise.py --parameters 32.5e6 --device cpu --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from opacus.optimizers.optimizer import _generate_noise

from dpdit.randomness import PrivateRandomness


def median_seconds(draw, runs: int, device: torch.device) -> float:
    times = []
    for _ in range(runs + 1):  # the first run warms up
        start = time.perf_counter()
        draw()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parameters", type=float, default=32.5e6, help="trainable parameters (DiT-S/2: 32.5e6)")
    parser.add_argument("--tensor-size", type=int, default=2**20, help="values per parameter tensor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    total = int(args.parameters)
    sizes = [args.tensor_size] * (total // args.tensor_size) + [total % args.tensor_size]
    references = [torch.zeros(size, device=device) for size in sizes if size]
    randomness = PrivateRandomness.secret()
    draws = {
        "torch generator (Opacus default)": lambda: [_generate_noise(1.0, r) for r in references],
        "Opacus secure_mode (4 normals)": lambda: [_generate_noise(1.0, r, secure_mode=True) for r in references],
        "dpdit secret AES-CTR stream": lambda: randomness.add_gaussian_noise(0, references, 1.0),
    }
    baseline = None
    print(f"{total / 1e6:.1f}M values on {device}, median of {args.runs}")
    for name, draw in draws.items():
        seconds = median_seconds(draw, args.runs, device)
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.3f} s | {seconds / baseline:.2f}x |")


if __name__ == "__main__":
    main()

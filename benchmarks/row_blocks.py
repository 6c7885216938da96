"""bf16 matrix products on this CPU: one product against two of half the rows each.

oneDNN, which runs PyTorch's bf16 products on a CPU, decides per shape how to spread a product over the threads;
for some shapes it leaves threads idle, and then two products of half the rows run faster than one. Run: `python
benchmarks/row_blocks.py` (about a minute on 2 cores). Shapes are SmolLM2-135M's frozen projections as training
meets them, for a range of token counts (rows): each forward product x W^T and each input-gradient product g W,
of q/o (576 -> 576), k/v (576 -> 192), gate/up (576 -> 1536) and down (1536 -> 576). Prints microseconds a row for
one product and for two half-products (medians of `--repeats`, alternating), two in bold where that is over 5%
faster. `benchmarks/library_ablation.py --variants row-blocks` measures what it gives a whole training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from library_ablation import GAIN, _mm  # benchmarks/, on the path when this file runs as a script

# (name, input width, output width) of SmolLM2-135M's projections
PROJECTIONS = [("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576)]


def median_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(one product, two half-products): medians of `repeats` timings each, alternating."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for blocks, measured in times.items():
            start = time.perf_counter()
            _mm(a, b, blocks)
            measured.append(time.perf_counter() - start)
    return statistics.median(times[1]), statistics.median(times[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 768, 1024, 1280, 1536, 2048])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; us a row: one product / two halves")
    print("| rows | product | " + " | ".join(name for name, _, _ in PROJECTIONS) + " |")
    print("|---|---|" + "---|" * len(PROJECTIONS))
    for rows in args.rows:
        for product in ("forward", "input gradient"):
            cells = []
            for _, width_in, width_out in PROJECTIONS:
                weight = torch.randn(width_out, width_in, dtype=torch.bfloat16) * 0.02
                if product == "forward":
                    a, b = torch.randn(rows, width_in, dtype=torch.bfloat16), weight.t()
                else:
                    a, b = torch.randn(rows, width_out, dtype=torch.bfloat16), weight
                for blocks in (1, 2):  # warm-up
                    _mm(a, b, blocks)
                whole, halves = median_seconds(a, b, args.repeats)
                mark = " **2**" if halves < GAIN * whole else ""
                cells.append(f"{whole / rows * 1e6:.2f} / {halves / rows * 1e6:.2f}{mark}")
            print(f"| {rows} | {product} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

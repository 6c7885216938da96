"""RMSNorm's and SwiGLU's backward in bf16: op by op (eager) against compiled into a loop (petune.kernels.fused).

Run: `python benchmarks/fused_backward.py` (compiles first: about half a minute on 2 cores). Shapes are
SmolLM2-135M's at batch 4 x 256 tokens: RMSNorm over 576, SwiGLU over 1536. Medians of `--repeats` timings
each, alternating; the eager column is what petune's kernels ran before (their in-place operations).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from petune.kernels import RMSNormFunction, SwiGLUFunction


def timed(step: Callable[[], None], repeats: int, compiled: bool) -> list[float]:
    os.environ["PETUNE_COMPILE"] = "1" if compiled else "0"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4, 256, 576, dtype=torch.bfloat16, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(576)).to(torch.bfloat16)
    gate, up = (torch.randn(4, 256, 1536, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    # each forward once; its backward timed, as autograd calls it
    cases = {
        "RMSNorm (4 x 256 x 576)": (RMSNormFunction.apply(x, weight, 1e-5, False), [x]),
        "SwiGLU (4 x 256 x 1536)": (SwiGLUFunction.apply(gate, up), [gate, up]),
    }
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; backward ms, median of {args.repeats}")
    print("| backward | eager ms | compiled ms | eager / compiled |\n|---|---|---|---|")
    for name, (out, inputs) in cases.items():
        grad = torch.randn_like(out)

        def step(out: torch.Tensor = out, inputs: list[torch.Tensor] = inputs, grad: torch.Tensor = grad) -> None:
            torch.autograd.grad(out, inputs, grad, retain_graph=True)

        for compiled in (False, True):  # warm-up, and the compile
            timed(step, 3, compiled)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for compiled, times in runs.items():
                times.extend(timed(step, 1, compiled))
        eager, fused = (statistics.median(runs[c]) * 1e3 for c in (False, True))
        print(f"| {name} | {eager:.3f} | {fused:.3f} | {eager / fused:.1f}x |")


if __name__ == "__main__":
    main()

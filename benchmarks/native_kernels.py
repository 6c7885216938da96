"""petune's C kernels (petune.kernels.native) against the op-by-op code they replace (PETUNE_NATIVE=0), in bf16.

Run: `python benchmarks/native_kernels.py`. Shapes are SmolLM2-135M's at batch 4 x 256 tokens: RMSNorm's backward
over 576, SwiGLU's over 1536, and one chunk of the loss (256 positions against the 49,152-word head: the logits'
matrix product, the softmax and cross-entropy, the gradient's product). Medians of `--repeats` timings each,
alternating between the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from petune.kernels import RMSNormFunction, SwiGLUFunction, native
from petune.loss import _FrozenHeadCrossEntropy


def timed(step: Callable[[], object], native_on: bool) -> float:
    os.environ[native.SWITCH] = "1" if native_on else "0"
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if native.library() is None:
        raise SystemExit("petune's C kernels did not build here (see the warning above)")
    torch.manual_seed(0)
    x = torch.randn(4, 256, 576, dtype=torch.bfloat16, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(576)).to(torch.bfloat16)
    gate, up = (torch.randn(4, 256, 1536, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    hidden = torch.randn(256, 576, dtype=torch.bfloat16, requires_grad=True)
    head = (0.05 * torch.randn(49152, 576)).to(torch.bfloat16)
    targets = torch.randint(0, 49152, (256,))
    norm, mlp = RMSNormFunction.apply(x, weight, 1e-5, False), SwiGLUFunction.apply(gate, up)
    norm_grad, mlp_grad = torch.randn_like(norm), torch.randn_like(mlp)
    cases: dict[str, Callable[[], object]] = {  # a backward as autograd calls it; the loss chunk forward
        "RMSNorm backward (4 x 256 x 576)": lambda: torch.autograd.grad(norm, [x], norm_grad, retain_graph=True),
        "SwiGLU backward (4 x 256 x 1536)": lambda: torch.autograd.grad(mlp, [gate, up], mlp_grad, retain_graph=True),
        "loss chunk (256 x 49152)": lambda: _FrozenHeadCrossEntropy.apply(hidden, head, None, targets, 256),
    }
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms, median of {args.repeats}")
    print("| operation | op by op ms | C kernel ms | op by op / C |\n|---|---|---|---|")
    for name, step in cases.items():
        for native_on in (False, True, False, True):  # warm-up
            timed(step, native_on)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for native_on, times in runs.items():
                times.append(timed(step, native_on))
        op_by_op, kernel = (statistics.median(runs[on]) * 1e3 for on in (False, True))
        print(f"| {name} | {op_by_op:.3f} | {kernel:.3f} | {op_by_op / kernel:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

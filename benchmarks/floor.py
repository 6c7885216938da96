"""The compute floor of one training step: its matrix multiplications and attention kernels, timed alone.

A step of a frozen model with small adapters is mostly the base model's own forward and activation backward.
This records every matrix multiplication and attention kernel one step calls (shapes, strides, dtypes),
replays each on random tensors of the same layout, and adds up their times: what the step would take if
everything else (elementwise work, the loss's softmax, the optimizer, Python) cost nothing. Against HF PEFT's
measured step it tells whether a target such as "step <= 0.8x peft's" can be reached without doing less
arithmetic than the step does.

    python benchmarks/floor.py --impl petune --method lora --dtype fp32
    python benchmarks/floor.py --impl peft --method lora --dtype bf16

Prints one JSON line: the measured step (median after one warm-up), the floor, its matmul and attention parts,
the matmuls' FLOPs and GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from step import METHODS, load_base, training_step, wrapped  # benchmarks/, on the path when this file runs as a script
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

Signature = tuple[Any, ...]  # (op, (size, stride, dtype) per tensor argument or the argument itself)


def is_compute(op: Any) -> bool:
    name = str(op)
    return name.startswith(("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.")) or "scaled_dot_product" in name


class Recorder(TorchDispatchMode):
    """Counts the matmul and attention calls of the code run under it, by layout."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Signature] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if is_compute(func):
            layout = tuple(describe(a) for a in args)
            self.calls[(func, layout, tuple(sorted((kwargs or {}).items())))] += 1
        return func(*args, **(kwargs or {}))


def describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
    return value


def rebuild(value: Any) -> Any:
    """A random tensor of a recorded layout (strides of 0, from `expand`, included), or the argument itself."""
    if isinstance(value, tuple) and value and value[0] == "tensor":
        _, size, stride, dtype, device = value
        if 0 in size:
            return torch.empty(size, dtype=dtype, device=device)
        storage = 1 + sum((n - 1) * step for n, step in zip(size, stride, strict=True))
        return torch.randn(storage, device=device).to(dtype).as_strided(size, stride)
    return value


def seconds_per_call(signature: Signature, repeats: int) -> float:
    op, layout, kwargs = signature
    args = [rebuild(a) for a in layout]
    call: Callable[[], Any] = lambda: op(*args, **dict(kwargs))  # noqa: E731
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["petune", "peft"], required=True)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=5, help="timed replays of each recorded kernel")
    args = parser.parse_args()

    model = load_base(args.method, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    step = training_step(args.impl, wrapped(args.impl, args.method, model))

    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    recorder, flops = Recorder(), FlopCounterMode(display=False)
    with flops, recorder:
        step()

    matmul_s = attention_s = 0.0
    for signature, count in recorder.calls.items():
        spent = count * seconds_per_call(signature, args.repeats)
        if "scaled_dot_product" in str(signature[0]):
            attention_s += spent
        else:
            matmul_s += spent
    counts = flops.get_flop_counts()["Global"]
    matmul_flops = sum(n for op, n in counts.items() if "mm" in str(op))
    step_s = statistics.median(times[1:])
    print(
        json.dumps(
            {
                "impl": args.impl,
                "method": args.method,
                "dtype": args.dtype,
                "step_s": round(step_s, 3),
                "floor_s": round(matmul_s + attention_s, 3),
                "matmul_s": round(matmul_s, 3),
                "attention_s": round(attention_s, 3),
                "rest_s": round(step_s - matmul_s - attention_s, 3),
                "matmul_gflop": round(matmul_flops / 1e9, 1),
                "matmul_gflop_per_s": round(matmul_flops / 1e9 / matmul_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

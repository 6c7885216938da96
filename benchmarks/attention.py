"""Causal attention forward + backward: torch's SDPA against petune's blocked kernel, and their bf16 error.

Run: `python benchmarks/attention.py` (about a minute on 2 cores). Shapes are SmolLM2-135M's attention (9 query
heads, 3 key/value heads, head size 64) at batch 4; queries, keys and values come as transformers hands them
over (transposed views of (B, T, heads, d)). For each length and dtype it alternates the two, takes the median
of `--repeats` timings each, and reports the largest error of the output and of each input's gradient against
an fp64 SDPA, relative to that tensor's largest value.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import forward_backward, interleaved  # benchmarks/, on the path when this file runs as a script

from petune.kernels.attention import BlockedCausalAttention

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = BlockedCausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)
    return out


def inputs(length: int, dtype: torch.dtype, batch: int = 4, heads: int = 9, kv_heads: int = 3) -> Tensors:
    torch.manual_seed(0)
    q, k, v = (2 * torch.randn(batch, length, n, 64) for n in (heads, kv_heads, kv_heads))
    return tuple(t.to(dtype).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))  # type: ignore[return-value]


def errors(function: Callable[..., torch.Tensor], tensors: Tensors, grad: torch.Tensor) -> list[float]:
    exact = [t.detach().double().requires_grad_() for t in tensors]
    reference = sdpa(*exact)
    reference.backward(grad.double())
    for tensor in tensors:
        tensor.grad = None
    out = function(*tensors)
    out.backward(grad)
    pairs = [(out, reference)] + [(t.grad, e.grad) for t, e in zip(tensors, exact, strict=True)]
    with torch.no_grad():
        return [float((got.double() - want).abs().max() / want.abs().max()) for got, want in pairs]  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 272, 512, 1024])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 4, 9 heads / 3 kv heads, head size 64")
    print("| dtype | length | SDPA ms | blocked ms | ratio | SDPA error (out, dq, dk, dv) | blocked error |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for length in args.lengths:
            tensors = inputs(length, dtype)
            grad = torch.randn(tensors[0].shape).to(dtype)
            functions = {"sdpa": sdpa, "blocked": blocked}
            calls = {name: functools.partial(forward_backward, f, tensors, grad) for name, f in functions.items()}
            times = interleaved(calls, args.repeats, warmup=2)
            ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
            errs = {name: ", ".join(f"{e:.1e}" for e in errors(f, tensors, grad)) for name, f in functions.items()}
            kind = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(
                f"| {kind} | {length} | {ms['sdpa']:.1f} | {ms['blocked']:.1f} | {ms['blocked'] / ms['sdpa']:.2f} "
                f"| {errs['sdpa']} | {errs['blocked']} |"
            )


if __name__ == "__main__":
    main()

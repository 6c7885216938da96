"""Causal attention behind a prefix, fp32 forward + backward: petune's merged flash calls against the others.

Run: `python benchmarks/prefix_attention.py` (under a minute on 2 cores). SmolLM2-135M's attention (9 query
heads, 3 key/value heads, head size 64), batch 4, `--virtual` prefix keys in front of each row's own; queries,
keys and values as transformers hands them over (transposed views of (B, T, heads, d)). The ways compared,
alternating, medians of `--repeats`:

    merged        `petune.kernels.prefix_attention.merged_prefix_attention` (what petune runs in fp32 on a CPU)
    zero queries  causal SDPA over V zero queries and the rows, the zero queries' outputs dropped
    masked        SDPA with the explicit (T, V + T) mask (what transformers runs for prefix tuning)
    rows alone    causal SDPA over the rows' own keys, no prefix (a LoRA step's attention)
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.nn.functional as F
from timing import forward_backward, interleaved  # benchmarks/, on the path when this file runs as a script

from petune.kernels.prefix_attention import merged_prefix_attention


def zero_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    virtual = pk.shape[2]
    padded = torch.cat([q.new_zeros(*q.shape[:2], virtual, q.shape[3]), q], dim=2)
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    out = F.scaled_dot_product_attention(padded, keys, values, is_causal=True, enable_gqa=True)
    return out[:, :, virtual:]


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    virtual, length = pk.shape[2], q.shape[2]
    mask = torch.ones(length, virtual + length, dtype=torch.bool).tril(virtual)
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, mask, enable_gqa=True)


def rows_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--virtual", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 4, 9 heads / 3 kv heads, head size 64")
    functions = {
        "merged": merged_prefix_attention,
        "zero queries": zero_queries,
        "masked": masked,
        "rows alone": rows_alone,
    }
    print(f"| length | prefix | {' | '.join(f'{name} ms' for name in functions)} |")
    print(f"|---|---|{'---|' * len(functions)}")
    for length in args.lengths:
        torch.manual_seed(0)
        shapes = [(length, 9), (length, 3), (length, 3), (args.virtual, 3), (args.virtual, 3)]
        tensors = [torch.randn(4, n, heads, 64).transpose(1, 2).requires_grad_() for n, heads in shapes]
        grad = torch.randn(tensors[0].shape)
        calls = {name: functools.partial(forward_backward, f, tensors, grad) for name, f in functions.items()}
        times = interleaved(calls, args.repeats, warmup=2)
        ms = " | ".join(f"{1000 * statistics.median(times[name]):.1f}" for name in functions)
        print(f"| {length} | {args.virtual} | {ms} |")


if __name__ == "__main__":
    main()

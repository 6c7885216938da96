"""Time petune's frozen-head loss (`petune.loss`) by chunk size, on SmolLM2's head shape.

The loss computes the logits of `chunk` labelled positions at a time in one reused (chunk, vocab) fp32 buffer.
Bigger chunks make the head's matmuls faster (each reads the whole (vocab, hidden) weight once per chunk) and
the buffer bigger. This times the loss and its input gradient for 1020 positions (4 x 256 tokens) at each
size, the sizes interleaved so that the machine's drift hits them alike, and prints the median and best time.

    python benchmarks/loss_chunk.py --dtype fp32
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from timing import interleaved  # benchmarks/, on the path when this file runs as a script

from petune.loss import _FrozenHeadCrossEntropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--positions", type=int, default=1020)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).to(dtype)
    hidden = torch.randn(args.positions, args.hidden).to(dtype)
    targets = torch.randint(0, args.vocab, (args.positions,))
    calls = {
        chunk: functools.partial(_FrozenHeadCrossEntropy.apply, hidden, weight, None, targets, chunk)
        for chunk in args.chunks
    }
    times = interleaved(calls, args.repeats)  # one warm-up round
    print(f"{args.positions} positions, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}")
    for chunk, seconds in times.items():
        buffer_mb = chunk * args.vocab * 4 / 2**20
        print(
            f"chunk {chunk:5d} ({buffer_mb:4.0f} MB fp32 buffer): median {1e3 * statistics.median(seconds):6.1f} ms, "
            f"best {1e3 * min(seconds):6.1f} ms"
        )


if __name__ == "__main__":
    main()

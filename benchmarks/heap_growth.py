"""glibc's main heap after each step of the library loop (`loss = model(**batch).loss; loss.backward()`), bf16,
the embedded SmolLM2 at 4 x 256 tokens, AdamW: where a plain `python train.py` keeps its memory.

    python benchmarks/heap_growth.py --method lora                     # the loop as users write it
    python benchmarks/heap_growth.py --method lora --variant keep-graph

Variants: `default` (petune detaches the previous step's spent loss as the next forward starts, `petune.loss_only`);
`keep-graph` (`model.detach_spent_loss = False`: the previous step's autograd graph stays with its loss until the
next forward has returned); `drop-graph` (the loop keeps `loss.detach()`, so the graph goes after backward);
`adam-first` (Adam's state made before the first step); `keep-grads` (`zero_grad(set_to_none=False)`);
`per-tensor-adam` (AdamW with `foreach=False`); `no-optimizer`. Prints the main heap's size (`malloc_info`) after
each step and the peak RSS. Run it on glibc (no LD_PRELOAD of another allocator).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re

import step  # benchmarks/, on the path when this file runs as a script
import torch

VARIANTS = ["default", "keep-graph", "drop-graph", "adam-first", "keep-grads", "per-tensor-adam", "no-optimizer"]


def main_heap_mb() -> int:
    """The size of glibc's main heap (arena 0) now, in MiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.fmemopen.restype = ctypes.c_void_p
    libc.fmemopen.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    buffer = ctypes.create_string_buffer(1 << 20)
    stream = libc.fmemopen(buffer, len(buffer), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    found = re.search(r'<heap nr="0">.*?<system type="current" size="(\d+)"/>', buffer.value.decode(), re.S)
    if found is None:
        raise RuntimeError("malloc_info printed no main heap: is this process on glibc's malloc?")
    return int(found.group(1)) >> 20


def main() -> None:
    from petune.plan.measure import peak_mb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "prefix", "prompt"])
    parser.add_argument("--variant", default="default", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = step.wrapped("petune", args.method, step.load_base(args.method, torch.bfloat16))
    model.detach_spent_loss = args.variant != "keep-graph"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=args.variant != "per-tensor-adam")
    if args.variant == "adam-first":  # the state made on zero gradients, before any activation exists
        for param in params:
            param.grad = torch.zeros_like(param)
        decay = optimizer.param_groups[0]["weight_decay"]
        optimizer.param_groups[0]["weight_decay"] = 0.0
        optimizer.step()
        optimizer.param_groups[0]["weight_decay"] = decay
        optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    heaps = []
    loss = None
    for _ in range(args.steps):
        loss = model(**batch).loss  # kept until the next step's forward returns, as a plain loop keeps it
        loss.backward()
        if args.variant != "no-optimizer":
            optimizer.step()
        optimizer.zero_grad(set_to_none=args.variant != "keep-grads")
        if args.variant == "drop-graph":
            loss = loss.detach()
        heaps.append(main_heap_mb())
    print(json.dumps({"method": args.method, "variant": args.variant, "heap_mb": heaps, "peak_rss_mb": peak_mb()}))


if __name__ == "__main__":
    main()

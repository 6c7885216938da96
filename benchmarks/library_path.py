"""The library path: a user's own loop, `model(**batch, labels=labels).loss.backward()`, petune vs HF PEFT.

The same script on both sides (`benchmarks/step.py --loop library`: forward with `labels=`, backward, AdamW) on
the embedded SmolLM2, one fresh process per measurement, petune and peft alternating. A library user runs on
whatever allocator their process starts with, so each case runs twice: both sides on the system allocator (a
plain `python train.py`), then both on mimalloc (`env $(python -m petune.memory) python train.py`). Written to
its section of BENCHMARKS.md, with issue 20's targets: step time <= 0.9x and peak memory <= 0.6x peft's.

    python benchmarks/library_path.py                        # bf16 LoRA, prefix and prompt tuning, both allocators
    python benchmarks/library_path.py --cases lora:bf16 --allocators system --out /tmp/library.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import e2e_trl  # benchmarks/, on the path when this file runs as a script
import run
from sections import stamped, write_section

SECTION = "## Library path: your own loop, petune vs HF PEFT"
TARGET_STEP = 0.9  # issue 20's targets, petune / peft
TARGET_MEMORY = 0.6
DEFAULT_CASES = ["lora:bf16", "prefix:bf16", "prompt:bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="method:dtype ...")
    parser.add_argument("--allocators", nargs="+", choices=["system", "mimalloc"], default=["system", "mimalloc"])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per process, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per side, alternating")
    parser.add_argument("--out", type=Path, default=run.HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--note", default="", help="said after the command (e.g. the machine's load)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: peak GPU memory, allocator moot")
    parser.add_argument("--shape", help="random weights in this `petune plan` model's shape (what a GPU run uses)")
    args = parser.parse_args()
    memory = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"

    rows = []
    for allocator in args.allocators:
        for case in args.cases:
            method, dtype = case.split(":")
            runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for _ in range(args.repeats):
                sides = [
                    run.measure(
                        impl, method, dtype, False, args.steps, allocator, args.device, args.shape, loop="library"
                    )
                    for impl in ("peft", "petune")
                ]
                print(allocator, case, sides, flush=True)
                runs.append((sides[1], sides[0]))
            ours, theirs = (run.median_of([pair[side] for pair in runs], ("step_s", memory)) for side in (0, 1))
            steps = [o["step_s"] / t["step_s"] for o, t in runs if "step_s" in o and "step_s" in t]
            rows.append(row(method, dtype, allocator, ours, theirs, steps, memory))

    command = e2e_trl.command_line("benchmarks/library_path.py", sys.argv[1:])
    note = stamped(args.note)
    gpu = memory == "peak_gpu_mb"
    section = SECTION + (" (GPU)" if gpu else "")
    where = f"{args.device} ({gpu_name()})" if gpu else f"{platform.machine()}, {os.cpu_count()} CPU cores"
    model = (
        f"Random weights in the shape of {args.shape}" if args.shape else "SmolLM2-135M-Instruct (the embedded model)"
    )
    peak = (
        "peak GPU memory (torch.cuda.max_memory_allocated) of a fresh process per measurement"
        if gpu
        else "peak RSS of a fresh process per measurement (model loading included)"
    )
    lines = [
        section,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {where}, Python "
        f"{platform.python_version()}. {model}, batch 4 x 256 random tokens, "
        "labels = inputs, AdamW; the same loop on both sides: `loss = model(**batch, labels=labels).loss; "
        "loss.backward()`. Median of the measured steps after one warm-up step"
        + (f", then of {args.repeats} runs per side" if args.repeats > 1 else "")
        + f"; {peak}. Both sides of a row run on "
        "the same allocator.",
        "",
        f"Command: `{command}`" + (f" ({note})" if note else ""),
        "",
        "| method | dtype | allocator | petune step s | peft step s | step ratio | petune peak MB | peft peak MB | "
        "memory ratio | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"targets: issue 20's, petune / peft on the same allocator: step time <= {TARGET_STEP}x, peak memory <= "
        f"{TARGET_MEMORY}x.",
    ]
    write_section(args.out, section, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def row(
    method: str,
    dtype: str,
    allocator: str,
    ours: dict[str, Any],
    theirs: dict[str, Any],
    steps: list[float],
    memory: str = "peak_rss_mb",
) -> str:
    verdicts = [
        run.verdict("step", ours, theirs, "step_s", TARGET_STEP),
        run.verdict("memory", ours, theirs, memory, TARGET_MEMORY),
    ]
    return (
        f"| {method} | {dtype} | {allocator} | {run.cell(ours, 'step_s', '.2f')} | {run.cell(theirs, 'step_s', '.2f')} "
        f"| {run.ratio(ours, theirs, 'step_s', steps)} | {run.cell(ours, memory, '.0f')} | "
        f"{run.cell(theirs, memory, '.0f')} | {run.ratio(ours, theirs, memory)} | {'; '.join(verdicts)} |"
    )


if __name__ == "__main__":
    main()

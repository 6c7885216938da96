"""Side-by-side training-step benchmark, petune vs HF PEFT, written to its section of BENCHMARKS.md.

Each measurement runs `benchmarks/step.py` in a fresh process; petune and peft alternate so that
drift of the machine (other load, thermal state) hits both alike. petune's processes run on the allocator
the `petune` command runs on (mimalloc where installed, `petune.memory`), peft's on the system allocator,
as a peft script runs; `--peft-allocator mimalloc` gives peft the same allocator as petune. After the
table comes the end-to-end comparison of `petune train` with TRL's SFTTrainer + peft
(`benchmarks/e2e_trl.py`), as its own section. Each run rewrites only its own sections (`sections.py`), so the
analysis written around them stays; each row says whether it meets issue 5's targets and by how much it misses.

    python benchmarks/run.py --repeats 3 --e2e-repeats 3   # `make bench`: everything, about 35 minutes on 2 cores
    python benchmarks/run.py                      # the table once a side (about 10 minutes), then end-to-end once
    python benchmarks/run.py --cases lora:fp32 lora:fp32:ckpt --out /tmp/b.md --no-e2e
    python benchmarks/run.py --no-e2e --repeats 3 --cases lora:fp32 prompt:bf16   # medians of 3 pairs of runs
    python benchmarks/run.py --e2e-only           # rewrite only the end-to-end section of BENCHMARKS.md
    python benchmarks/run.py --no-e2e --peft-allocator mimalloc --out /tmp/same-allocator.md
    python benchmarks/run.py --no-e2e --cases oft:fp32 adalora:fp32 --section "## Issue 21's methods"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import e2e_trl  # benchmarks/, on the path when this file runs as a script
from sections import stamped, write_section

HERE = Path(__file__).resolve().parent
SECTION = "## Step table: petune vs HF PEFT (`make bench`)"
# Issue 5's targets, at equal dtype and settings: petune / peft.
TARGET_STEP = 0.8
TARGET_MEMORY = 0.6
TARGET_MEMORY_CHECKPOINTING = 0.35  # with checkpointing on, against peft's default (checkpointing off)
# The issue's table (method:dtype), plus checkpointing (":ckpt") for two of them.
DEFAULT_CASES = [
    "lora:fp32", "lora:bf16", "lora_all:fp32", "lora_all:bf16", "dora:fp32", "prompt:fp32", "prompt:bf16",
    "ptuning:fp32", "prefix:fp32", "prefix:bf16", "qlora:bf16", "lora:fp32:ckpt", "prefix:fp32:ckpt",
]  # fmt: skip


def measure(
    impl: str,
    method: str,
    dtype: str,
    checkpointing: bool,
    steps: int,
    allocator: str,
    device: str,
    shape: str | None,
    loop: str = "petune",
    batch: tuple[int, int] = (4, 256),
) -> dict[str, Any]:
    """`benchmarks/step.py` in a fresh process on `allocator`: its JSON result, or {"error": its last line}."""
    command = [sys.executable, str(HERE / "step.py"), "--impl", impl, "--method", method, "--dtype", dtype]
    command += ["--loop", loop]
    command += ["--steps", str(steps), "--device", device] + (["--checkpointing"] if checkpointing else [])
    command += ["--batch-size", str(batch[0]), "--seq-len", str(batch[1])]
    command += ["--shape", shape] if shape else []
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=e2e_trl.environment(allocator))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"impl": impl, "error": tail[0]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def median_of(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One side's result over its runs: the median of each of `keys`, or the first failure if none ran."""
    done = [run for run in runs if "step_s" in run]
    if not done:
        return runs[0]
    result = dict(done[0])
    for key in keys:
        if all(key in run for run in done):
            result[key] = statistics.median(run[key] for run in done)
    result["runs"] = len(done)
    return result


def ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str, pairs: list[float] | None = None) -> str:
    if key not in ours or key not in theirs:
        return "—"
    spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if pairs and len(pairs) > 1 else ""
    return f"{ours[key] / theirs[key]:.2f}{spread}"


def allocators(rows: list[Any], side: int) -> str:
    """The allocator(s) one side's processes ran on, as step.py reported them."""
    names = sorted({row[side]["allocator"] for row in rows if "allocator" in row[side]})
    return " and ".join(names) or "unknown"


def cell(result: dict[str, Any], key: str, fmt: str) -> str:
    return format(result[key], fmt) if key in result else f"failed: {result.get('error', '?')[:60]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="method:dtype[:ckpt] ...")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per side and case, alternating")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--shape", help="random weights in this `petune plan` model's shape (e.g. llama-2-7b)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument(
        "--peft-allocator",
        choices=["system", "mimalloc"],
        default="system",
        help="peft's processes' allocator (petune's: mimalloc, as the `petune` command runs)",
    )
    parser.add_argument("--note", default="", help="said after each section's command (e.g. the machine's load)")
    parser.add_argument("--section", default=SECTION, help="the heading of the step table's section in --out")
    end_to_end = parser.add_mutually_exclusive_group()
    end_to_end.add_argument("--no-e2e", action="store_true", help="the step table only")
    end_to_end.add_argument("--e2e-only", action="store_true", help="only the end-to-end section, kept in --out")
    e2e_trl.add_arguments(parser, prefix="e2e-")
    args = parser.parse_args()

    command = e2e_trl.command_line("benchmarks/run.py", sys.argv[1:])
    note = stamped(args.note)
    if not args.e2e_only:
        step_table(args, command, note)
    if not args.no_e2e:
        e2e_trl.run_section(e2e_trl.settings_from(args, prefix="e2e_"), args.e2e_repeats, args.out, command, note)


def step_table(args: argparse.Namespace, command: str, note: str) -> None:
    """Measure `args.cases` and write their table into its section of `args.out`."""
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    memory = "peak_gpu_mb" if device.startswith("cuda") else "peak_rss_mb"
    rows: list[Row] = []
    for case in args.cases:
        method, dtype, *rest = case.split(":")
        checkpointing = rest == ["ckpt"]
        pairs = []
        for _ in range(args.repeats):
            batch = (args.batch_size, args.seq_len)
            theirs = measure(
                "peft", method, dtype, checkpointing, args.steps, args.peft_allocator, device, args.shape, batch=batch
            )
            ours = measure(
                "petune", method, dtype, checkpointing, args.steps, "mimalloc", device, args.shape, batch=batch
            )
            pairs.append((ours, theirs))
            print(case, ours, theirs, flush=True)
        keys = ("step_s", memory)
        ours, theirs = (median_of([pair[side] for pair in pairs], keys) for side in (0, 1))
        steps = [o["step_s"] / t["step_s"] for o, t in pairs if "step_s" in o and "step_s" in t]
        rows.append((method, dtype, checkpointing, ours, theirs, steps))

    lines = [
        args.section,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores"
        f"{_gpu_name(device)}, Python {platform.python_version()}. "
        + (
            f"Random weights in the shape of {args.shape}, "
            if args.shape
            else "SmolLM2-135M-Instruct (the embedded model), "
        )
        + f"batch {args.batch_size} x {args.seq_len} random tokens, labels = inputs, AdamW; "
        f"{_how_measured(args.repeats, memory)} "
        "petune computes the loss with "
        "`petune.loss.causal_lm_loss` (no full logits); peft with the model's own `labels=` loss. "
        f"Host allocator: petune {allocators(rows, 3)} (what the `petune` command runs on), "
        f"peft {allocators(rows, 4)}.",
        "",
        f"Command: `{command}`" + (f" ({note})" if note else ""),
        "",
    ]
    lines += [*table(rows, memory), "", TARGETS_NOTE]
    write_section(args.out, args.section, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


# One case: method, dtype, checkpointing, petune's result, peft's result, the step ratio of each pair of runs.
Row = tuple[str, str, bool, dict[str, Any], dict[str, Any], list[float]]


def table(rows: list[Row], memory: str) -> list[str]:
    """The step table's lines, a row per case, each with its verdict on the targets."""
    lines = [
        "| method | dtype | checkpointing | petune step s | peft step s | step ratio | petune peak MB | "
        "peft peak MB | memory ratio | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peft_default = {(method, dtype): theirs for method, dtype, checkpointing, _, theirs, _ in rows if not checkpointing}
    for method, dtype, checkpointing, ours, theirs, steps in rows:
        baseline = peft_default.get((method, dtype)) if checkpointing else theirs
        lines.append(
            f"| {method} | {dtype} | {'on' if checkpointing else 'off'} | {cell(ours, 'step_s', '.2f')} | "
            f"{cell(theirs, 'step_s', '.2f')} | {ratio(ours, theirs, 'step_s', steps)} | "
            f"{cell(ours, memory, '.0f')} | {cell(theirs, memory, '.0f')} | {ratio(ours, theirs, memory)} | "
            f"{targets(ours, theirs, baseline, memory, checkpointing)} |"
        )
    return lines


TARGETS_NOTE = (
    f"targets: issue 5's, petune / peft at equal dtype and settings: step time <= {TARGET_STEP}x; peak memory <= "
    f"{TARGET_MEMORY}x, or with checkpointing <= {TARGET_MEMORY_CHECKPOINTING}x peft's same method and dtype "
    "without checkpointing (its default, its row in this table). A missed target shows the ratio it "
    "needed and by how much it missed."
)


def targets(
    ours: dict[str, Any], theirs: dict[str, Any], baseline: dict[str, Any] | None, memory: str, checkpointing: bool
) -> str:
    """Whether a row meets issue 5's step and memory targets, and by how much it misses one."""
    step = verdict("step", ours, theirs, "step_s", TARGET_STEP)
    if not checkpointing:
        return f"{step}; {verdict('memory', ours, theirs, memory, TARGET_MEMORY)}"
    if baseline is None:
        return f"{step}; memory: no peft row without checkpointing to compare with"
    without = verdict("memory", ours, baseline, memory, TARGET_MEMORY_CHECKPOINTING)
    return f"{step}; {without} of peft without checkpointing"


def verdict(name: str, ours: dict[str, Any], theirs: dict[str, Any], key: str, target: float) -> str:
    if key not in ours or key not in theirs:
        return f"{name}: not measured"
    value = ours[key] / theirs[key]
    if value <= target:
        return f"{name} met ({value:.2f}x)"
    return f"{name} missed by {value - target:.2f} ({value:.2f}x, target <= {target}x)"


def _how_measured(repeats: int, memory: str) -> str:
    median = "median of the measured steps after one warm-up step"
    if repeats > 1:
        median += (
            f", then the median of {repeats} runs per side (petune and peft alternating; the step ratio's range over "
            "the pairs of runs in brackets)"
        )
    if memory == "peak_gpu_mb":
        return f"{median}; peak GPU memory allocated by torch (`torch.cuda.max_memory_allocated`)."
    return f"{median}; peak RSS of a fresh process per measurement (model loading included)."


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    import torch

    return f", GPU {torch.cuda.get_device_name(torch.device(device))}"


if __name__ == "__main__":
    main()

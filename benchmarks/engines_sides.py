"""`petune train --strategy` beside HF PEFT + accelerate (benchmarks/engines_peft.py) on the same config.

For each case both sides run, one after the other (which goes first alternates from case to case), each process
tree sampled the same way (engines.sample_peaks): the largest peak RSS of its training processes and the median
tokens/s of the steps after the first. Then each side's saved adapter is read back: "whole" when it holds every
LoRA tensor petune's holds, with the same shapes, none empty (peft users saving under ZeRO-3 without gathering
get empty tensors). One run a case.

    python benchmarks/engines_sides.py                                 # ddp:1 ddp:2 zero2:2 zero3:2 fsdp:2
    python benchmarks/engines_sides.py --cases zero3:2 --save plain    # peft's save_pretrained, not gathered
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from e2e_trl import environment
from engines import run_case, sample_peaks, summarize
from safetensors import safe_open

CASES = ["ddp:1", "ddp:2", "zero2:2", "zero3:2", "fsdp:2"]
PEFT_SCRIPT = Path(__file__).with_name("engines_peft.py")


def peft_command(strategy: str, nproc: int, steps: int, output: Path, model: str | None, save: str) -> list[str]:
    """engines_peft.py as a user starts it: plain python for one DDP process, else `accelerate launch`."""
    script = [str(PEFT_SCRIPT), "--strategy", strategy, "--batch-size", str(4 // nproc), "--steps", str(steps)]
    script += ["--max-length", "128", "--output", str(output), "--save", save, *(["--model", model] if model else [])]
    if strategy == "ddp" and nproc == 1:
        return [sys.executable, *script]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // nproc)  # what petune's launcher gives each process
    launch = ["--multi_gpu", "--num_machines", "1", "--num_processes", str(nproc)]
    launch += ["--num_cpu_threads_per_process", str(threads), "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port)]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", *launch, *script]


def run_peft(
    strategy: str, nproc: int, steps: int, folder: Path, model: str | None, save: str, allocator: str = "system"
) -> dict[str, float]:
    output = folder / f"peft-{strategy}-{nproc}"
    command = peft_command(strategy, nproc, steps, output, model, save)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=environment(allocator))
    peaks = sample_peaks(process)
    if process.returncode != 0:
        raise SystemExit(f"peft {strategy} x {nproc} failed ({process.returncode})")
    return summarize(peaks, nproc, output / "metrics.jsonl")


def shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


def whole(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str:
    """'whole (N tensors)' when `theirs` has petune's tensors and shapes, none empty; else what is wrong."""
    empty = sum(0 in shape for shape in theirs.values())
    if empty:
        return f"{empty} of {len(theirs)} tensors empty"
    if theirs != ours:
        return f"{len(theirs)} tensors, not petune's {len(ours)} (names or shapes differ)"
    return f"whole ({len(theirs)} tensors)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=CASES, help="STRATEGY:NPROC (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--save", choices=["gathered", "plain"], default="gathered", help="the peft side's save")
    parser.add_argument(
        "--peft-allocator",
        choices=["system", "mimalloc"],
        default="system",
        help="the peft side's host allocator (petune's side runs on mimalloc, as the `petune` command does)",
    )
    args = parser.parse_args()
    print(
        "| strategy | processes | petune peak RSS per process (MB) | peft peak RSS per process (MB) | peft / petune "
        "| petune tokens/s | peft tokens/s | peft adapter |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for index, case in enumerate(args.cases):
            strategy, nproc = case.split(":")[0], int(case.split(":")[1])
            results = {}
            for side in ("petune", "peft") if index % 2 == 0 else ("peft", "petune"):
                if side == "petune":
                    results[side] = run_case(strategy, nproc, args.steps, Path(tmp), args.model)
                else:
                    results[side] = run_peft(
                        strategy, nproc, args.steps, Path(tmp), args.model, args.save, args.peft_allocator
                    )
            ours = shapes(Path(tmp) / f"{strategy}-{nproc}" / "adapter")
            adapter = whole(ours, shapes(Path(tmp) / f"peft-{strategy}-{nproc}"))
            petune, peft = results["petune"], results["peft"]
            ratio = peft["peak_rss_mb"] / petune["peak_rss_mb"]
            print(
                f"| {strategy} | {nproc} | {petune['peak_rss_mb']:.0f} | {peft['peak_rss_mb']:.0f} | {ratio:.2f} "
                f"| {petune['tokens_per_s']:.0f} | {peft['tokens_per_s']:.0f} | {adapter} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

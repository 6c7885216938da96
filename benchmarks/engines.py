"""`petune train --strategy` on CPU: peak RSS of each training process and tokens/s, 1 and 2 processes.

Each case runs `petune train` on the embedded SmolLM2-135M (LoRA on all linear layers, fp32, global batch
4 x 128 tokens) and samples the resident memory of every process it starts every 0.1 s; tokens/s is the
median over the steps after the first (metrics.jsonl, summed over processes). One run a case: a sketch of
what each engine costs, not a timing to three digits.

    python benchmarks/engines.py                       # every case, ~10 min on 2 cores
    python benchmarks/engines.py --cases zero3:2 ddp:1 --model MODEL_FOLDER
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CASES = ["ddp:1", "ddp:2", "zero2:2", "zero3:2", "fsdp:2", "zero3:1", "fsdp:1"]


def run_case(strategy: str, nproc: int, steps: int, folder: Path, model: str | None) -> dict[str, float]:
    output = folder / f"{strategy}-{nproc}"
    args = ["train", "--output", str(output), "--overwrite", "true", "--max-steps", str(steps)]
    args += ["--model", model] if model else []
    args += ["--batch-size", str(4 // nproc), "--max-length", "128", "--lora.target-modules", "all-linear"]
    args += ["--eval-samples", "0", "--eval-before", "false", "--eval-every", "0", "--save-every", "0"]
    args += ["--strategy", strategy, "--nproc", str(nproc)]
    process = subprocess.Popen([sys.executable, "-m", "petune.cli", *args], stdout=subprocess.DEVNULL)
    peaks = sample_peaks(process)
    if process.returncode != 0:
        raise SystemExit(f"{strategy} x {nproc} failed ({process.returncode})")
    return summarize(peaks, nproc, output / "metrics.jsonl")


def summarize(peaks: dict[int, int], nproc: int, metrics: Path) -> dict[str, float]:
    """The largest peak RSS of the `nproc` training processes, and the median tokens/s after the first step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    training = sorted(peaks.values())[-nproc:]  # the launcher itself holds no model
    return {"peak_rss_mb": max(training) / 1e6, "tokens_per_s": statistics.median(speeds)}  # the global batch's rate


def sample_peaks(process: subprocess.Popen[bytes]) -> dict[int, int]:
    """Peak RSS (bytes) of `process` and of every process it starts, by pid, sampled every 0.1 s until it exits."""
    peaks: dict[int, int] = {}
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                peaks[member.pid] = max(peaks.get(member.pid, 0), member.memory_info().rss)
        time.sleep(0.1)
    process.wait()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=CASES, help="STRATEGY:NPROC (default: all)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    print("| strategy | processes | peak RSS per process (MB) | tokens/s (all processes) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            strategy, nproc = case.split(":")
            result = run_case(strategy, int(nproc), args.steps, Path(tmp), args.model)
            print(f"| {strategy} | {nproc} | {result['peak_rss_mb']:.0f} | {result['tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

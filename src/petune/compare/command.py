"""`petune compare`: the same model, data and steps for several methods; a table and charts of the results."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TextIO

from petune.compare.report import write_reports
from petune.compare.run import DEFAULT_METHODS, compare
from petune.train import UserError

SHARED = ("model", "data", "val_data", "max_steps", "batch_size", "max_length", "eval_samples", "seed")
# The default comparison: six methods on the embedded model and the demo data in 7 minutes on two idle CPU
# cores (measured, README.md). The demo records are ~60 tokens, so --max-length does not bind there.
DEFAULT_STEPS, DEFAULT_BATCH = 20, 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `petune compare` options (the parser itself is made in petune.cli)."""
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated `petune train` methods (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--model", help="as for petune train (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help="training data (default: the bundled demo set)")
    parser.add_argument("--val-data", help="held-out data (default: a share of --data)")
    parser.add_argument(
        "--max-steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per method (default: {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help=f"records per step (default: {DEFAULT_BATCH})"
    )
    parser.add_argument("--max-length", type=int, help="tokens per example (default: petune train's)")
    parser.add_argument("--eval-samples", type=int, help="held-out records scored by generation (default: train's)")
    parser.add_argument("--seed", type=int, help="the same seed for every method (default: train's)")
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="cap on the total wall time of the runs: each method may use the time left divided by the methods "
        "left; one still running at the end of its share is stopped and reported 'over budget', without results "
        "(default: no cap; every method runs all its steps)",
    )
    parser.add_argument("--output", help="folder for the runs and compare.{json,md,png} (default: runs/compare-<time>)")


def run(args: argparse.Namespace, out: TextIO) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods needs at least one method")
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget must be positive, got {args.budget}")
    output = Path(args.output or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    shared: list[str] = []
    setup: dict[str, object] = {"methods": ",".join(methods), "budget_s": args.budget}
    for name in SHARED:
        value = getattr(args, name)
        if value is not None:
            shared += [f"--{name.replace('_', '-')}", str(value)]
            setup[name] = value
    rows = compare(methods, shared, output, args.budget)
    paths = write_reports(rows, setup, output)
    print(paths["markdown"].read_text(), file=out)
    print(f"written: {', '.join(str(p) for p in paths.values())}", file=out)
    return 0 if all(r.status == "done" for r in rows) else 1

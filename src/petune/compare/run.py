"""Train several methods one after another on the same model, data and steps; one row of results per method.

Each method is a `petune train` run in its own process, so its peak resident memory is its own (read with
`os.wait4`) and a method that runs past its share of `--budget` can be stopped without losing the others.
The share is the time left divided by the methods left, so a fast method leaves more to the next.

The runs write no checkpoints (a comparison is not resumed, and a full fine-tuning checkpoint is four times
the model: its weights twice and AdamW's two moments) and compute the held-out loss at the end only, the
number the table reports. The base model is scored before training by the first run only: it is the same
model for every method.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from petune.train import UserError

DEFAULT_METHODS = ("full", "lora", "dora", "prompt", "ptuning", "prefix")


@dataclass
class Row:
    """What one method's run gave. Memory in MiB (peak RSS of its process), times in seconds."""

    method: str
    status: str  # "done", "over budget" or "failed (exit N)"
    heldout_loss: float | None
    exact_match_before: float | None  # the base model's; measured by the first run only
    exact_match_after: float | None
    trainable_params: int | None
    peak_memory_mb: float
    wall_time_s: float
    saved_bytes: int | None  # the weights the run saved: its adapter, or the whole model for full fine-tuning
    run_dir: str


def compare(methods: list[str], train_args: list[str], output: Path, budget_s: float | None) -> list[Row]:
    """Run `petune train <train_args> --method M --output <output>/M` for each method; return their rows.

    `train_args` are the options every run shares (model, data, steps, batch size ...).
    """
    from petune.train.config import METHOD_NAMES

    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise UserError(f"--methods: {', '.join(unknown)} cannot be trained; choose from: {', '.join(METHOD_NAMES)}")
    output.mkdir(parents=True, exist_ok=True)
    started, rows = time.monotonic(), []
    for index, method in enumerate(methods):
        timeout = None
        if budget_s is not None:
            timeout = max(1.0, (budget_s - (time.monotonic() - started)) / (len(methods) - index))
        run_dir = output / method
        argv = ["train", *train_args, "--method", method, "--output", str(run_dir), "--overwrite"]
        argv += ["--save-every", "0", "--eval-every", "0", *(["--eval-before", "false"] if index > 0 else [])]
        print(f"[{index + 1}/{len(methods)}] petune {' '.join(argv)}", flush=True)
        rows.append(run_one(method, argv, run_dir, timeout))
    return rows


def run_one(method: str, argv: list[str], run_dir: Path, timeout: float | None) -> Row:
    """One `petune train` process, stopped after `timeout` seconds; its results from the run folder."""
    begun = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "petune.cli", *argv])
    status, code, peak_mb = wait_with_usage(process, None if timeout is None else begun + timeout)
    if status == "done" and code != 0:
        status = f"failed (exit {code})"
    wall = time.monotonic() - begun
    results = _read_json(run_dir / "eval.json")
    weights = [f for folder in ("adapter", "model") for f in (run_dir / folder).glob("*.safetensors")]
    return Row(
        method=method,
        status=status,
        heldout_loss=results.get("heldout", {}).get("loss"),
        exact_match_before=results.get("before", {}).get("exact_match"),
        exact_match_after=results.get("after", {}).get("exact_match"),
        trainable_params=_trainable_params(run_dir),
        peak_memory_mb=round(peak_mb, 1),
        wall_time_s=round(wall, 1),
        saved_bytes=sum(f.stat().st_size for f in weights) if weights else None,
        run_dir=str(run_dir),
    )


def wait_with_usage(process: subprocess.Popen[bytes], deadline: float | None) -> tuple[str, int, float]:
    """("done" or "over budget", exit code, peak RSS in MiB) of `process`, killed at `deadline`.

    The child is reaped with `os.wait4`, which returns its own resource usage (Popen.wait would reap it
    without); Popen is told the exit code so it does not wait again.
    """
    status = "done"
    while True:
        pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            os.kill(process.pid, signal.SIGKILL)  # not process.kill(), whose poll() could reap the child first
            status = "over budget"
            _, wait_status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return status, process.returncode, usage.ru_maxrss / 1024  # Linux reports kB


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _trainable_params(run_dir: Path) -> int | None:
    """The run's trainable parameters, counted by `petune plan` from the model's shape and the run's options
    (AdaLoRA's trained ranks, not the pruned ones its adapter file keeps)."""
    from petune.embedded import resolve_model_path
    from petune.plan.architectures import resolve_architecture
    from petune.plan.counts import adapter_params
    from petune.plan.setup import LAYER_METHODS, Setup, parse_targets
    from petune.train.config import TrainConfig

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    method = cfg["method"]
    options = cfg.get(method if method in ("prompt", "ptuning", "prefix", *LAYER_METHODS) else "lora", {})
    targets = options.get("target_modules") or ["q_proj", "v_proj"]
    try:
        arch = resolve_architecture(resolve_model_path(cfg.get("model")))
        setup = Setup(
            method=method,
            lora_r=int(options.get("r", 8)),
            lora_targets=parse_targets(",".join(targets)) if method not in LAYER_METHODS else ("q_proj", "v_proj"),
            virtual_tokens=int(options.get("num_virtual_tokens", 20)),
            encoder_hidden_size=int(options.get("encoder_hidden_size", 128)),
            prefix_projection=bool(options.get("prefix_projection", False)),
            options=type(getattr(TrainConfig(), method))(**options) if method in LAYER_METHODS else None,
        )
    except (UserError, OSError, TypeError):
        return None
    return adapter_params(arch, setup)


def rows_as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]

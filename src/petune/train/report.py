"""The run folder and what the user reads: config, metrics.jsonl, the adapter, eval.json, the plot.

<run>/config.yaml        the resolved options (`petune train --config <run>/config.yaml` repeats the run)
<run>/metrics.jsonl      one JSON object per step (loss, lr, grad_norm, tokens_per_s) and per evaluation
<run>/adapter/           the trained adapter, HF PEFT format
<run>/model/             instead of adapter/ for --method full: the whole model and its tokenizer (plain HF)
<run>/eval.json          held-out loss and accuracy, before and after, with the generations
<run>/loss.png           training and held-out loss per step
<run>/checkpoints/       see checkpoint.py
<run>/tensorboard/ ...   with --report-to: see trackers.py
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from petune import PeftModel
from petune.files import read_json
from petune.memory import running_allocator
from petune.train import UserError
from petune.train.config import TrainConfig
from petune.train.data import Dataset
from petune.train.methods import parameter_counts
from petune.train.plot import plot_metrics

SAMPLES_SHOWN = 4


def default_output(method: str) -> str:
    return str(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder; refuse to overwrite one unless asked (--overwrite or --resume)."""
    run_dir = Path(cfg.output or default_output(cfg.method))
    if cfg.resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not a run folder (no config.yaml); nothing to continue")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not cfg.overwrite:
            raise UserError(
                f"run folder {run_dir} already exists; pass --overwrite to replace it or --resume to continue it"
            )
        shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Metrics:
    """Appends one JSON object per line to metrics.jsonl (main process only), and hands it to `also`
    (the `--report-to` trackers, trackers.py) when given."""

    def __init__(self, path: Path, enabled: bool, also: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.enabled, self.also = path, enabled, also

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.also is not None:
                self.also(row)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval.json"
    fix = f"delete {path} (it holds the before/after accuracies; the run writes it again at its end)"
    results: dict[str, Any] = read_json(path, "results file", fix) if path.is_file() else {}
    return results


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, run_dir / "eval.json")


def describe_start(
    cfg: TrainConfig, run_dir: Path, data: Dataset, model: nn.Module, global_batch: int, lr: float
) -> None:
    trainable, total = parameter_counts(model)
    print(
        f"model: {cfg.model or 'embedded SmolLM2-135M-Instruct'} | method: {cfg.method} | "
        f"host allocator: {running_allocator()} | run folder: {run_dir}"
    )
    print(
        f"data: {data.train_records} training records ({len(data.train)} rows), {len(data.val)} held out | "
        f"truncated to {cfg.max_length} tokens: {data.truncated}"
    )
    print(
        f"trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%) | "
        f"{cfg.max_steps} steps x {global_batch} examples, lr {lr:g} ({cfg.schedule})"
    )


def save_trained(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path, state_dict: dict[str, Any] | None = None
) -> Path:
    """Save what the run trained and return its folder: `<run>/adapter` (HF PEFT format) or, for full
    fine-tuning, `<run>/model` with the tokenizer (a plain transformers folder, loaded with `--model`).
    `state_dict`: the trained tensors gathered from a sharded engine, saved instead of the live parameters.

    Atomically: written beside the target, then renamed over it.
    """
    full = not isinstance(model, PeftModel)
    target = run_dir / ("model" if full else "adapter")
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))  # type: ignore[operator]
    if full:
        tokenizer.save_pretrained(tmp)
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        os.rename(target, old)
        shutil.rmtree(old)
    os.rename(tmp, target)
    return target


def finish(
    run_dir: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    results: dict[str, Any],
    data: Dataset,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the adapter (or model), eval.json and the plot; print the before/after summary."""
    saved = save_trained(model, tokenizer, run_dir, state_dict)
    records = data.val_records[: cfg.eval_samples]
    if "after" in results:
        results["samples"] = [
            {
                "prompt": r.question,
                "expected": r.reference,
                "before": results.get("before", {}).get("predictions", [None] * len(records))[i],
                "after": results["after"]["predictions"][i],
            }
            for i, r in enumerate(records)
        ]
    write_results(run_dir, results)
    plot_metrics(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png")
    print()
    if "heldout" in results:
        held = results["heldout"]
        also = f"perplexity {held['perplexity']:.2f}" if "perplexity" in held else ""
        also = also or f"chosen preferred {held['rewards/accuracies']:.1%}, reward margin {held['rewards/margins']:.3f}"
        print(f"held-out loss {held['loss']:.4f} ({also})")
    if "after" in results:
        count = results["after"]["count"]
        before = f"{results['before']['exact_match']:.1%} -> " if "before" in results else ""
        print(f"held-out exact match ({count} records): {before}{results['after']['exact_match']:.1%}")
        _print_samples(results["samples"][:SAMPLES_SHOWN])
    print(f"\nrun folder {run_dir}:")
    print(f"  {saved.name:<12} {saved}  ({'HF PEFT format' if saved.name == 'adapter' else 'transformers folder'})")
    print(f"  metrics      {run_dir / 'metrics.jsonl'}")
    print(f"  plot         {run_dir / 'loss.png'}")
    print(f"  eval results {run_dir / 'eval.json'}")
    print(f"  config       {run_dir / 'config.yaml'}")
    model_flag = f" --model {cfg.model}" if cfg.model else ""
    flags = f"--model {saved}" if saved.name == "model" else f"{model_flag} --adapter {saved}".strip()
    print(f'try it: petune generate {flags} "<your prompt>"')


def _print_samples(samples: list[dict[str, Any]]) -> None:
    print("\nsamples (held out):")
    for sample in samples:
        print(f"  prompt:   {sample['prompt'][-100:]}")
        print(f"  expected: {sample['expected']}")
        if sample["before"] is not None:
            print(f"  before:   {sample['before'][:100]!r}")
        print(f"  after:    {sample['after'][:100]!r}")

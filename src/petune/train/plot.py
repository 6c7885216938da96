"""The loss curve of a run: training loss per step and held-out loss at each evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write a PNG of `loss` and `eval_loss` against `step` from metrics.jsonl rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    heldout = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if heldout:
        axes.plot(*zip(*heldout, strict=True), "o-", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per completion token)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

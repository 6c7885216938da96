"""The comparison as JSON, a Markdown table and a PNG of bar charts (compare.json, compare.md, compare.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from petune.compare.run import Row, rows_as_dicts

# (Row field, chart title, unit scale, log scale)
CHARTS = (
    ("heldout_loss", "held-out loss", 1.0, False),
    ("exact_match_after", "held-out exact match", 1.0, False),
    ("trainable_params", "trainable parameters", 1.0, True),
    ("peak_memory_mb", "peak memory (MiB)", 1.0, False),
    ("wall_time_s", "wall time (s)", 1.0, False),
    ("saved_bytes", "saved weights (KiB)", 1 / 1024, True),
)


def write_reports(rows: list[Row], setup: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write the three files into `output`; return their paths by format."""
    paths = {"json": output / "compare.json", "markdown": output / "compare.md", "png": output / "compare.png"}
    paths["json"].write_text(json.dumps({"setup": setup, "methods": rows_as_dicts(rows)}, indent=2) + "\n")
    paths["markdown"].write_text(markdown(rows, setup))
    plot(rows, paths["png"])
    return paths


def markdown(rows: list[Row], setup: dict[str, Any]) -> str:
    """A Markdown table, one line per method, with the shared setup and the base model's score above it."""
    base = next((r.exact_match_before for r in rows if r.exact_match_before is not None), None)
    lines = [
        "# petune compare",
        "",
        ", ".join(f"{key}: {value}" for key, value in setup.items()),
        "",
        f"base model before training: held-out exact match {_pct(base)}",
        "",
        "| method | held-out loss | exact match | trainable params | peak memory | wall time | saved weights "
        "| status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {_num(r.heldout_loss, '.4f')} | {_pct(r.exact_match_after)} "
            f"| {_num(r.trainable_params, ',d')} | {r.peak_memory_mb:.0f} MiB | {r.wall_time_s:.0f} s "
            f"| {_size(r.saved_bytes)} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """One bar chart per measure, methods on the x axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    names = [r.method for r in rows]
    for ax, (field, title, scale, log) in zip(axes.flat, CHARTS, strict=True):
        values = [getattr(r, field) for r in rows]
        heights = [v * scale if v is not None and not math.isnan(v) else 0.0 for v in values]
        ax.bar(names, heights, color="tab:blue")
        ax.set_title(title)
        if log and any(h > 0 for h in heights):
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"

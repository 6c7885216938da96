"""`petune compare` on a tiny model: every method's row, and the three outputs (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from petune.cli import main


def compare_args(model: Path, data: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    train, val = data
    return [
        "compare", "--model", str(model), "--data", str(train), "--val-data", str(val), "--output", str(output),
        "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--eval-samples", "2", *extra,
    ]  # fmt: skip


def test_compare_writes_json_markdown_and_png(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cmp"
    assert main(compare_args(tiny_model_dir, tiny_data, output, "--methods", "full,lora,prompt")) == 0
    result = json.loads((output / "compare.json").read_text())
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == ["full", "lora", "prompt"] and result["setup"]["max_steps"] == 2
    for row in rows.values():
        assert row["status"] == "done"
        assert row["heldout_loss"] > 0 and 0 <= row["exact_match_after"] <= 1
        assert row["peak_memory_mb"] > 100 and row["wall_time_s"] > 0 and row["saved_bytes"] > 0
    # the tiny model: hidden 32, 2 layers, q 32 -> 32 and v 32 -> 16 with r 8; prompt tuning: 50 virtual tokens of 32
    model_params = load_file(tiny_model_dir / "model.safetensors")
    assert rows["full"]["trainable_params"] == sum(t.numel() for t in model_params.values())
    assert rows["lora"]["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + 16))
    assert rows["prompt"]["trainable_params"] == 50 * 32
    assert rows["full"]["saved_bytes"] > (tiny_model_dir / "model.safetensors").stat().st_size * 0.99
    assert rows["lora"]["saved_bytes"] < 2 * 4 * rows["lora"]["trainable_params"]  # the adapter only
    assert not (output / "full" / "checkpoints").exists()  # a comparison is not resumed: no checkpoints
    # the base model is scored once, by the first run
    assert rows["full"]["exact_match_before"] is not None
    assert rows["lora"]["exact_match_before"] is None and rows["prompt"]["exact_match_before"] is None
    markdown = (output / "compare.md").read_text()
    assert "| full |" in markdown and "| lora |" in markdown and "| prompt |" in markdown
    assert f"held-out exact match {rows['full']['exact_match_before']:.1%}" in markdown
    assert (output / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare.png" in capsys.readouterr().out


def test_budget_stops_a_run_and_says_so(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cmp"
    code = main(compare_args(tiny_model_dir, tiny_data, output, "--methods", "lora", "--budget", "0.5"))
    assert code == 1  # not every run finished
    row = json.loads((output / "compare.json").read_text())["methods"][0]
    assert row["status"] == "over budget" and row["wall_time_s"] < 10


def test_unknown_method_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--methods", "lora,adapterfusion", "--output", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "adapterfusion cannot be trained" in error and "choose from: full, lora" in error
    assert not (tmp_path / "x").exists()


def test_defaults_are_the_six_methods_of_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: full,lora,dora,prompt,ptuning,prefix" in text
    assert "over budget" in text

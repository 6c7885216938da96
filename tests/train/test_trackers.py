"""`--report-to`: the TensorBoard event file holds metrics.jsonl's values; a missing tracker is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from petune.cli import main
from petune.train import UserError, trackers
from petune.train.config import build_config
from tests.train.tiny import tiny_args

QUICK = ["--eval-samples", "0", "--eval-before", "false", "--save-every", "0"]


def scalars(logdir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag in a TensorBoard log folder."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tensorboard_event_file_holds_the_metrics(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main([*tiny_args(tiny_model_dir, tiny_data, run), *QUICK, "--report-to", "tensorboard"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        expected = {row["step"]: np.float32(row[key]) for row in rows if key in row}
        assert len(expected) >= 2, key
        assert scalars(run / "tensorboard", key) == expected, key  # TensorBoard keeps float32
    assert (run / "config.yaml").read_text().count("report_to:\n- tensorboard") == 1


def test_no_tracker_by_default(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), *QUICK, "--max-steps", "1"]) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_tracker_package_is_one_line_naming_the_install(
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), "--report-to", "tensorboard"]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines() == [
        "petune train: error: --report-to tensorboard needs the tensorboard package, not installed: "
        "pip install tensorboard"
    ]
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize(
    ("value", "message"),
    [("tensorbored", "--report-to 'tensorbored' is unknown; choose from: none,"), ("none,wandb", "cannot be combined")],
)
def test_bad_report_to(value: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config({"report_to": value})
    assert build_config({"report_to": "tensorboard,wandb"}).report_to == ["tensorboard", "wandb"]


def test_hyperparameters_are_flat_scalars() -> None:
    flat = trackers.hyperparameters(build_config({"lora": {"target_modules": "q_proj,v_proj"}}).to_dict())
    assert flat["lora.target_modules"] == "q_proj,v_proj" and flat["lora.r"] == 8 and flat["model"] == "none"
    assert all(isinstance(value, bool | int | float | str) for value in flat.values())

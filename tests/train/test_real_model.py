"""`petune train` with no model and no data: the embedded SmolLM2-135M-Instruct on the bundled demo set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petune.cli import main

pytestmark = pytest.mark.real_model


def test_the_demo_configuration_runs_on_the_embedded_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    short = ["--max-steps", "2", "--batch-size", "2", "--eval-samples", "2", "--eval-every", "0", "--save-every", "0"]
    assert main(["train", "--output", str(run), *short]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["before"]["count"] == 2 and results["after"]["count"] == 2
    assert results["heldout"]["loss"] < 2.0  # the instruct model already knows the chat format and digits
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["target_modules"] == ["q_proj", "v_proj"]

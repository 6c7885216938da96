"""The README's scripts (examples/) run as written, on the tiny model, and save an adapter petune and peft load."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", ["trainer_lora.py", "trl_sft.py", "trl_dpo.py"])
def test_example_trains_and_saves_the_adapter(
    script: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    argv = [script, "--model", str(tiny_model_dir), "--output", str(output), "--max-steps", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert (output / "adapter_config.json").is_file()
    assert not (output / "model.safetensors").exists()
    keys = load_file(output / "adapter_model.safetensors")
    assert keys and all(".lora_" in key for key in keys)

"""The README's scripts (examples/) run as written, on the tiny model, and save an adapter petune and peft load."""

from __future__ import annotations

import runpy
import subprocess
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
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/x.py` does: the examples import _common.py
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert (output / "adapter_config.json").is_file()
    assert not (output / "model.safetensors").exists()
    keys = load_file(output / "adapter_model.safetensors")
    assert keys and all(".lora_" in key for key in keys)


HIDE_PEFT = """
import os, runpy, sys

class HidePeft:  # every import finder, blind to the peft package
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "peft" else self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [HidePeft(finder) for finder in sys.meta_path]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
assert "peft" not in sys.modules
"""


def test_trainer_example_runs_without_peft_installed(tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    script = EXAMPLES / "trainer_lora.py"
    argv = [str(script), "--model", str(tiny_model_dir), "--output", str(output), "--max-steps", "2"]
    subprocess.run([sys.executable, "-c", HIDE_PEFT, *argv], cwd=tmp_path, check=True, capture_output=True)
    assert (output / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (output / "checkpoint-2" / "model.safetensors").exists()

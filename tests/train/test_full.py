"""`--method full`: every weight of the model trains, and the run saves the whole model as a transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from petune.cli import main
from petune.train.commands import run_eval
from petune.train.config import build_config
from petune.train.methods import learning_rate, parameter_counts, peft_config
from tests.train.tiny import assert_every_weight_moved, tiny_args

FULL = ["--method", "full", "--max-steps", "6", "--save-every", "0"]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    assert main([*tiny_args(tiny_model_dir, tiny_data, run), *FULL]) == 0
    return run


def test_full_has_no_adapter_and_its_own_learning_rate() -> None:
    cfg = build_config({"method": "full"})
    assert peft_config(cfg, "unused") is None
    assert learning_rate(cfg) == 1e-4


def test_every_weight_trains_and_the_held_out_loss_goes_down(
    full_run: Path, tiny_model_dir: Path, tiny_data: tuple[Path, Path]
) -> None:
    assert not (full_run / "adapter").exists()
    assert_every_weight_moved(full_run, tiny_model_dir)
    _, val = tiny_data
    before = run_eval(str(tiny_model_dir), None, str(val), max_length=64, batch_size=4, samples=1)["loss"]
    after = json.loads((full_run / "eval.json").read_text())["heldout"]["loss"]
    assert after < before - 0.5, (before, after)


def test_the_saved_folder_is_a_transformers_model_that_reproduces_the_run(
    full_run: Path, tiny_model_dir: Path, tiny_data: tuple[Path, Path]
) -> None:
    folder = full_run / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainable, total = parameter_counts(model)
    assert trainable == total == parameter_counts(AutoModelForCausalLM.from_pretrained(tiny_model_dir))[1]
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    _, val = tiny_data
    reloaded = run_eval(str(folder), None, str(val), max_length=64, batch_size=4, samples=1)["loss"]
    assert reloaded == pytest.approx(json.loads((full_run / "eval.json").read_text())["heldout"]["loss"], abs=1e-5)


def test_adapter_commands_point_a_full_run_to_its_model(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--adapter", str(full_run), "hi"]) == 2
    error = capsys.readouterr().err
    assert "full fine-tuning run" in error and f"--model {full_run / 'model'}" in error

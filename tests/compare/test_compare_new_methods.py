"""`petune compare --methods` with the methods `petune plan` does not count: their rows count what trained."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from petune import VeraConfig, get_peft_model
from petune.cli import main
from tests.compare.test_compare import compare_args


def test_a_vera_row_counts_its_trained_parameters(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    output = tmp_path / "cmp"
    assert main(compare_args(tiny_model_dir, tiny_data, output, "--methods", "vera", "--eval-samples", "0")) == 0
    rows = {row["method"]: row for row in json.loads((output / "compare.json").read_text())["methods"]}
    assert rows["vera"]["status"] == "done"
    # train's defaults are VeraConfig's; the saved file also holds the frozen projection, which is not counted
    expected = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), VeraConfig())
    assert rows["vera"]["trainable_params"] == expected.get_nb_trainable_parameters()[0]

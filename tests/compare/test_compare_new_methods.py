"""`petune compare --methods` with the layer methods of issue 21: each row counts what trained (`petune plan`'s
count from the run's options), not what the adapter file holds (VeRA's frozen projection, AdaLoRA's pruning)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from petune import get_peft_model
from petune.cli import main
from petune.train.config import build_config
from petune.train.methods import peft_config
from tests.compare.test_compare import compare_args

METHODS = ("vera", "adalora")


def test_rows_count_what_trained(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "cmp"
    args = compare_args(tiny_model_dir, tiny_data, output, "--methods", ",".join(METHODS), "--eval-samples", "0")
    assert main(args) == 0
    rows = {row["method"]: row for row in json.loads((output / "compare.json").read_text())["methods"]}
    for method in METHODS:
        assert rows[method]["status"] == "done", method
        config = peft_config(build_config({"method": method}), str(tiny_model_dir))
        expected = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
        assert rows[method]["trainable_params"] == expected.get_nb_trainable_parameters()[0], method

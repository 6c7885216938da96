"""TRL's `peft_config=` given a petune config: the trainer wraps the base model with petune, trains and saves it.

TRL checks `isinstance(peft_config, peft.PeftConfig)` and calls peft's `get_peft_model`; petune's patch
(`petune.integrations.trainer._take_petune_configs`) makes both take a petune config.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from petune import LoraConfig, PeftModel
from tests.integrations.test_trl import (
    adapter_tensors,
    assert_trained_and_saved,
    losses,
    preference_rows,
    prompt_completion_rows,
    run_settings,
)

TRAINERS = {
    "sft": (SFTTrainer, SFTConfig, prompt_completion_rows),
    "dpo": (DPOTrainer, DPOConfig, preference_rows),
}


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_trainer_wraps_the_model_with_petune(
    kind: str, tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    trainer_class, config_class, rows = TRAINERS[kind]
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = config_class(**run_settings(tmp_path / "run", max_steps=2, save_steps=2))
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows(8)),
        processing_class=tokenizer,
        peft_config=config,
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.peft_config["default"], LoraConfig)
    before = adapter_tensors(model)
    trainer.train()
    assert_trained_and_saved(model, before, tmp_path / "run" / "checkpoint-2")
    if kind == "dpo":  # no "ref" adapter: the reference is the adapter switched off, equal to LoRA's zero start
        assert "ref" not in model.peft_config and abs(losses(trainer)[0] - math.log(2)) < 1e-4

    trainer.save_model(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")  # HF PEFT's own loader
    ids = torch.tensor([tokenizer("Convert March 3, 1999 to ISO.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)


PATCH_OFF = """
import peft, trl.trainer.sft_trainer as sft
import petune
petune.LoraConfig(r=4)
assert sft.PeftConfig is peft.PeftConfig and sft.get_peft_model is peft.get_peft_model
"""


def test_the_patch_stays_off_with_petune_trainer_patch_0() -> None:
    env = {**os.environ, "PETUNE_TRAINER_PATCH": "0"}
    subprocess.run([sys.executable, "-c", PATCH_OFF], env=env, check=True, capture_output=True, timeout=300)

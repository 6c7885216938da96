"""TRL's SFTTrainer on the embedded SmolLM2-135M-Instruct with a petune LoRA adapter; the adapter it saves loads in
the real `peft` with the same logits as the trained petune model."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from petune import LoraConfig, get_peft_model
from petune.embedded import load_model_and_tokenizer
from tests.train.tiny import chat_rows

pytestmark = pytest.mark.real_model


def test_sft_on_smollm2_saves_an_adapter_peft_loads(tmp_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    settings = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 64}
    args = SFTConfig(str(tmp_path / "run"), report_to="none", use_cpu=True, bf16=False, **settings)
    data = Dataset.from_list(chat_rows(4))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trained = model.adapter_state_dict("default")
    assert any(".lora_B." in key and value.abs().max() > 0 for key, value in trained.items())  # B starts at zero
    trainer.save_model(str(tmp_path / "adapter"))
    batch = dict(tokenizer(["The capital of France is"], return_tensors="pt"))
    model.eval()
    reloaded = peft.PeftModel.from_pretrained(load_model_and_tokenizer()[0].eval(), tmp_path / "adapter")
    with torch.no_grad():
        ours, theirs = model(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

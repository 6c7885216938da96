"""TRL's `SFTTrainer` and `DPOTrainer` given a petune model, on the tiny Llama with SmolLM2's tokenizer.

SFT with LoRA is compared with the same run on the real `peft` package, from the same adapter weights: TRL's
reported losses agree step by step. The other cases check that training runs, moves the adapter and
checkpoints it in HF PEFT's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from petune import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from tests.train.tiny import chat_rows

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
CONFIGS: dict[str, PeftConfig] = {
    "lora": LoraConfig(task_type="CAUSAL_LM", **LORA),
    "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def prompt_completion_rows(count: int) -> list[dict[str, Any]]:
    rows = chat_rows(count)
    return [{"prompt": [row["messages"][0]], "completion": [row["messages"][1]]} for row in rows]  # type: ignore[index]


def preference_rows(count: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Year of March 1, {1990 + i}?", "chosen": f" {1990 + i}", "rejected": f" {1890 + i}"}
        for i in range(count)
    ]


def run_settings(output: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "output_dir": str(output),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "max_length": 64,
        "bf16": False,  # TRL's default is True; a CPU multiplies bf16 matrices slowly
    }
    return {**settings, **overrides}


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.adapter_state_dict("default").items()}


def losses(trainer: Any) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_trained_and_saved(model: PeftModel, before: dict[str, torch.Tensor], checkpoint: Path) -> None:
    after = adapter_tensors(model)
    assert any(not torch.equal(before[key], after[key]) for key in before), "training changed no adapter weight"
    assert (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert set(load_file(checkpoint / "adapter_model.safetensors")) == set(before)


def test_sft_lora_reports_the_losses_peft_does(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Prompt/completion data, completion-only loss (TRL's default for it): petune and peft, one adapter."""
    data = Dataset.from_list(prompt_completion_rows(12))
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(task_type="CAUSAL_LM", **LORA)
    )
    peft_model.save_pretrained(tmp_path / "initial")
    petune_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "initial", is_trainable=True
    )
    before = adapter_tensors(petune_model)
    runs, accuracies = [], []
    for name, model in (("peft", peft_model), ("petune", petune_model)):
        args = SFTConfig(**run_settings(tmp_path / name, completion_only_loss=True))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        runs.append(losses(trainer))
        accuracies.append([e["mean_token_accuracy"] for e in trainer.state.log_history if "loss" in e])
    assert len(runs[1]) == 3
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=0, atol=2e-3)
    # TRL's token accuracy, read from its fused LM head's outputs in training mode (petune's training forward
    # without logits leaves those calls to TRL)
    torch.testing.assert_close(torch.tensor(accuracies[1]), torch.tensor(accuracies[0]), rtol=0, atol=1e-6)
    assert_trained_and_saved(petune_model, before, tmp_path / "petune" / "checkpoint-3")


@pytest.mark.parametrize("method", ["prompt_tuning"])  # LoRA: examples/trl_sft.py, run by test_examples.py
def test_sft_conversational_packed(
    method: str, tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), CONFIGS[method])
    before = adapter_tensors(model)
    args = SFTConfig(**run_settings(tmp_path / "run", packing=True, bf16=True))  # TRL's default, autocast on CPU
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(chat_rows(24)), processing_class=tokenizer
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert_trained_and_saved(model, before, tmp_path / "run" / "checkpoint-3")


def test_dpo_without_a_reference_model_starts_at_log_2(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """TRL makes a frozen copy of the adapter ("ref") its reference: at step one policy = reference, loss = ln 2."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), CONFIGS["lora"])
    before = adapter_tensors(model)
    args = DPOConfig(**run_settings(tmp_path / "run"))
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(preference_rows(12)), processing_class=tokenizer
    )
    assert sorted(model.peft_config) == ["default", "ref"]
    assert not any(param.requires_grad for param in model._adapter_parameters("ref"))
    trainer.train()
    first = losses(trainer)[0]
    assert abs(first - torch.log(torch.tensor(2.0)).item()) < 1e-4
    reference = model.adapter_state_dict("ref")
    for key, value in before.items():
        torch.testing.assert_close(reference[key], value, rtol=0, atol=0)  # the reference never trained
    assert_trained_and_saved(model, before, tmp_path / "run" / "checkpoint-3")


def test_an_adapter_on_lm_head_is_refused_under_trl(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """TRL's fused LM head reads lm_head.weight itself: a LoRA there would silently never train."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    args = SFTConfig(**run_settings(tmp_path / "run"))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(chat_rows(8)), processing_class=tokenizer
    )
    with pytest.raises(ValueError, match=r"fused LM head.*remove 'lm_head'"):
        trainer.train()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sft_evaluates(method: str, tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), CONFIGS[method])
    data = Dataset.from_list(chat_rows(8))
    args = SFTConfig(**run_settings(tmp_path / "run", per_device_eval_batch_size=4))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))

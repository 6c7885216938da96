"""transformers' own `Trainer`, default arguments, on a petune model: trains, checkpoints the adapter, resumes.

Each run is a few steps of a tiny Llama (tied embeddings, as SmolLM2's: a whole-model checkpoint of it is
refused by safetensors) on a dataset of `input_ids` / `attention_mask` / `labels` columns.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from petune import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    peft_model,
)
from petune.loss_only import loss_only_forward
from tests.conftest import VOCAB_SIZE, build_batch, build_tiny_model, model_output

CONFIGS: dict[str, PeftConfig] = {
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "dora": LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def tiny_petune(method: str) -> PeftModel:
    return get_peft_model(build_tiny_model("llama", tie_word_embeddings=True), CONFIGS[method])


def token_dataset(rows: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB_SIZE, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids})


def arguments(output: Path, **overrides: Any) -> TrainingArguments:
    """Default `TrainingArguments` but for the run's length, logging and CPU."""
    settings: dict[str, Any] = {
        "output_dir": str(output),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
    }
    return TrainingArguments(**{**settings, **overrides})


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.adapter_state_dict("default").items()}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainer_trains_and_every_checkpoint_is_the_adapter(method: str, tmp_path: Path) -> None:
    model = tiny_petune(method)
    before = adapter_tensors(model)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path / "run", eval_strategy="steps", eval_steps=2),
        train_dataset=token_dataset(),
        eval_dataset=token_dataset(rows=4, seed=1),
    )
    trainer.train()
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").is_file()
        assert not (checkpoint / "model.safetensors").exists()
        assert set(load_file(checkpoint / "adapter_model.safetensors")) == set(before)
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    after = adapter_tensors(model)
    assert any(not torch.equal(before[key], after[key]) for key in before), "training changed no adapter weight"

    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    batch = build_batch()
    reloaded = PeftModel.from_pretrained(build_tiny_model("llama", tie_word_embeddings=True), tmp_path / "final")
    torch.testing.assert_close(model_output(reloaded, batch), model_output(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_resume_from_checkpoint_continues_where_the_run_stopped(method: str, tmp_path: Path) -> None:
    data = token_dataset()
    straight = tiny_petune(method)
    Trainer(model=straight, args=arguments(tmp_path / "run"), train_dataset=data).train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")  # as if the run had stopped after step 2's checkpoint

    resumed = tiny_petune(method)  # fresh: its adapter is the initial one until the checkpoint loads
    trainer = Trainer(model=resumed, args=arguments(tmp_path / "run"), train_dataset=data)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_gradient_checkpointing_argument_trains_the_same_adapter(method: str, tmp_path: Path) -> None:
    results = []
    for checkpointing in (False, True):
        model = tiny_petune(method)
        args = arguments(tmp_path / str(checkpointing), max_steps=2, save_strategy="no")
        args.gradient_checkpointing = checkpointing
        Trainer(model=model, args=args, train_dataset=token_dataset()).train()
        results.append(adapter_tensors(model))
    plain, checkpointed = results
    assert any(not torch.equal(plain[key], tiny) for key, tiny in adapter_tensors(tiny_petune(method)).items())
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_the_loss_without_logits_trains_what_the_full_logits_train(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trainer passes `labels` and `num_items_in_batch` in training mode: petune's loss without the full logits
    (`petune.loss_only`) logs the same losses and trains the same adapter as with `return_logits = True`."""
    calls = []
    monkeypatch.setattr(peft_model, "loss_only_forward", lambda *a: calls.append(a) or loss_only_forward(*a))
    runs = []
    for return_logits in (False, True):
        model = tiny_petune(method)
        model.return_logits = return_logits
        args = arguments(tmp_path / str(return_logits), max_steps=2, save_strategy="no", gradient_accumulation_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
        trainer.train()
        runs.append(([e["loss"] for e in trainer.state.log_history if "loss" in e], adapter_tensors(model)))
    (lean_losses, lean), (full_losses, full) = runs
    assert len(lean_losses) == 2 and len(calls) == 4  # 2 steps of 2 micro-batches, all without logits
    torch.testing.assert_close(torch.tensor(lean_losses), torch.tensor(full_losses), rtol=1e-5, atol=1e-6)
    for key in full:
        torch.testing.assert_close(lean[key], full[key], rtol=0, atol=1e-6)


def test_a_frozen_adapter_is_refused_with_a_petune_error(tmp_path: Path) -> None:
    tiny_petune("lora").save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(build_tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"no trainable parameters.*is_trainable=True"):
        Trainer(model=frozen, args=arguments(tmp_path / "run"), train_dataset=token_dataset())


def test_disabled_adapters_are_refused_when_training_starts(tmp_path: Path) -> None:
    model = tiny_petune("lora")
    trainer = Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=token_dataset())
    with model.disable_adapter(), pytest.raises(ValueError, match=r"adapters are disabled.*outside that block"):
        trainer.train()


def test_a_merged_adapter_is_refused_with_a_petune_error(tmp_path: Path) -> None:
    model = tiny_petune("lora")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter"):
        Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=token_dataset())


def test_save_pretrained_takes_the_adapter_from_a_given_state_dict(tmp_path: Path) -> None:
    """Trainer passes `state_dict=` (gathered by DeepSpeed ZeRO-3 or FSDP); those values are what gets saved."""
    model = tiny_petune("lora")
    given = {name: value + 1 for name, value in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=given)
    saved, live = load_file(tmp_path / "adapter_model.safetensors"), adapter_tensors(model)
    assert set(saved) == set(live)
    for key, value in live.items():
        torch.testing.assert_close(saved[key], value + 1, rtol=0, atol=0)

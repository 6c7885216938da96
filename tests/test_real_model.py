"""LoRA on the real embedded SmolLM2-135M-Instruct (fp32, CPU): a few checks that tiny models cannot make.

Marked `real_model` (deselect with `-m "not real_model"`); each test takes a second or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from transformers import PreTrainedModel

from petune import LoraConfig, PeftModel, get_peft_model
from petune.embedded import load_model_and_tokenizer
from petune.layers import AdapterLayer

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "Low-rank adapters make fine-tuning"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_model_and_tokenizer()[1]


@pytest.fixture
def model() -> PreTrainedModel:
    """A fresh copy of the model for each test (wrapping changes it in place)."""
    return load_model_and_tokenizer()[0].eval()


@pytest.fixture
def batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**batch).logits
    return result


def random_adapter(model: PreTrainedModel, **kwargs: Any) -> PeftModel:
    """An adapter on every attention and MLP projection, with a small random (non-zero) update."""
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear", init_lora_weights=False, **kwargs)
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.1)
    return wrapped


def test_identity_at_init(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> None:
    expected = logits(model, batch)
    wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, use_dora=True))
    torch.testing.assert_close(logits(wrapped, batch), expected, rtol=0, atol=1e-6)


def test_petune_adapter_loads_in_peft(model: PreTrainedModel, batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    base = logits(model, batch)
    wrapped = random_adapter(model, use_dora=True)
    expected = logits(wrapped, batch)
    assert (expected - base).abs().max() > 1e-2
    wrapped.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(load_model_and_tokenizer()[0].eval(), tmp_path)
    assert (logits(reference, batch) - expected).abs().max().item() <= 1e-5


def test_merge_and_unload(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> None:
    wrapped = random_adapter(model, use_dora=True)
    expected = logits(wrapped, batch)
    merged = wrapped.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [n for n, m in merged.named_modules() if isinstance(m, AdapterLayer)]
    # fp32 rounding through 30 merged layers: 1.5e-4 on an AMD EPYC (torch 2.13), under 1e-4 on the Intel Xeon
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=3e-4)


def test_one_training_step_lowers_the_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> None:
    wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    wrapped.train()
    loss = wrapped(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    wrapped.eval()
    with torch.no_grad():
        after = wrapped(**batch, labels=labels).loss
    assert after.item() < loss.item() - 1e-3, (loss.item(), after.item())

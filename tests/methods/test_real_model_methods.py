"""IA3, LN tuning, LoHa, LoKr, VeRA, HRA, FourierFT, OFT, BOFT and AdaLoRA on the embedded SmolLM2-135M-Instruct
(fp32, CPU): petune's adapter loads into the real `peft` with the same logits, on the model the demo trains (and
peft's into petune, for the last three). A few seconds per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import petune
from petune import get_peft_model
from petune.embedded import load_model_and_tokenizer
from tests.methods.tuner_checks import perturb

pytestmark = pytest.mark.real_model

METHODS: dict[str, dict[str, Any]] = {
    "IA3Config": {},
    "LNTuningConfig": {},
    "LoHaConfig": {"r": 4, "target_modules": ["q_proj", "down_proj"]},
    "LoKrConfig": {"r": 4, "target_modules": ["k_proj", "up_proj"]},
    "VeraConfig": {"r": 64},
    "HRAConfig": {"r": 4},
    "FourierFTConfig": {"n_frequency": 200, "scaling": 50.0, "init_weights": True},
    "OFTConfig": {"oft_block_size": 16},
    "BOFTConfig": {"boft_block_size": 8},
    "AdaLoraConfig": {"init_r": 4, "target_r": 2, "total_step": 10},
}
# Also checked the other way (peft's folder into petune) for the methods added last.
FROM_PEFT = ("OFTConfig", "BOFTConfig", "AdaLoraConfig")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tokenizer = load_model_and_tokenizer()[1]
    return dict(tokenizer(["The capital of France is", "Adapters make fine-tuning"], return_tensors="pt", padding=True))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**batch).logits
    return result


@pytest.mark.parametrize("method", list(METHODS))
def test_petune_adapter_loads_in_peft(method: str, batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = load_model_and_tokenizer()[0].eval()
    base = logits(model, batch)
    wrapped = get_peft_model(model, getattr(petune, method)(task_type="CAUSAL_LM", **METHODS[method]))
    # every method starts unchanged (HRA's cancelling reflections up to fp32 rounding through 30 layers: ~5e-5)
    torch.testing.assert_close(logits(wrapped, batch), base, rtol=0, atol=1e-4)
    perturb(wrapped, seed=0, scale=0.05)
    expected = logits(wrapped, batch)
    assert (expected - base).abs().max() > 1e-2
    wrapped.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(load_model_and_tokenizer()[0].eval(), tmp_path)
    torch.testing.assert_close(logits(reference, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", FROM_PEFT)
def test_peft_adapter_loads_in_petune(method: str, batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    theirs = peft.get_peft_model(
        load_model_and_tokenizer()[0].eval(), getattr(peft, method)(task_type="CAUSAL_LM", **METHODS[method])
    )
    perturb(theirs, seed=1, scale=0.05)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)
    ours = petune.PeftModel.from_pretrained(load_model_and_tokenizer()[0].eval(), tmp_path)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=1e-5)

"""Mixed precision: a bf16 frozen base with fp32 adapter weights and optimizer state.

The documented tolerance: over 20 AdamW steps on a tiny Llama, every bf16 loss is within 1% of the fp32
run's loss at the same step (measured: at most 0.07%, LoRA; bf16 keeps 8 mantissa bits, ~0.4% per rounding).
"""

from __future__ import annotations

import pytest
import torch

import petune
from petune.loss import causal_lm_loss
from tests.conftest import build_batch, build_tiny_model

TOLERANCE = 0.01


def loss_curve(dtype: torch.dtype, config: petune.PeftConfig, steps: int = 20) -> tuple[list[float], petune.PeftModel]:
    model = build_tiny_model("llama").to(dtype)
    torch.manual_seed(0)
    wrapped = petune.get_peft_model(model, config)
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    batch = build_batch(pad=False, rows=4, length=16)
    batch["labels"] = batch["input_ids"]
    losses = []
    for _ in range(steps):
        loss = causal_lm_loss(wrapped, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, wrapped


CONFIGS = {
    "lora": lambda: petune.LoraConfig(r=4, lora_alpha=8),
    "dora": lambda: petune.LoraConfig(r=4, lora_alpha=8, use_dora=True),
    "prompt": lambda: petune.PromptTuningConfig(num_virtual_tokens=4),
    "prefix": lambda: petune.PrefixTuningConfig(num_virtual_tokens=4),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_base_trains_fp32_adapters_like_the_fp32_run(method: str) -> None:
    full, _ = loss_curve(torch.float32, CONFIGS[method]())
    mixed, model = loss_curve(torch.bfloat16, CONFIGS[method]())
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert mixed[-1] < mixed[0]  # it learns
    for step, (a, b) in enumerate(zip(full, mixed, strict=True)):
        assert abs(a - b) <= TOLERANCE * a, f"step {step}: fp32 {a:.4f} vs bf16 {b:.4f}"

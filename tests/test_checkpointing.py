"""Gradient (activation) checkpointing works for every method: same gradients, less kept in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import petune
from petune.loss import causal_lm_loss
from tests.conftest import build_batch, build_tiny_model

CONFIGS: dict[str, Callable[[], Any]] = {
    "lora": lambda: petune.LoraConfig(r=4, init_lora_weights=False),
    "dora": lambda: petune.LoraConfig(r=4, init_lora_weights=False, use_dora=True),
    "prompt": lambda: petune.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": lambda: petune.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix": lambda: petune.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
}


def gradients(method: str, checkpointing: dict[str, bool] | None, arch: str) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter's gradients after one backward pass, and how many elements autograd kept for it."""
    model = build_tiny_model(arch)
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    torch.manual_seed(0)
    wrapped = petune.get_peft_model(model, CONFIGS[method]())
    wrapped.train()
    batch = build_batch(pad=False)
    batch["labels"] = batch["input_ids"]
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    # Tensors autograd keeps for backward outside checkpointed blocks (inside them, checkpointing's own
    # hooks take over and keep nothing).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = causal_lm_loss(wrapped, batch)
    loss.backward()
    return {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}, sum(saved)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_checkpointing_gives_the_same_gradients(method: str, arch: str) -> None:
    reference, kept = gradients(method, None, arch)
    checkpointed, kept_checkpointed = gradients(method, {"use_reentrant": False}, arch)
    assert reference and reference.keys() == checkpointed.keys()
    assert kept_checkpointed < 0.5 * kept  # checkpointing did take effect
    for name, grad in reference.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_reentrant_checkpointing_still_reaches_the_adapters(method: str) -> None:
    # transformers' reentrant checkpointing only back-propagates into a block whose input needs a gradient;
    # with a frozen embedding nothing does unless the wrapper asks for it (HF PEFT users call
    # enable_input_require_grads() by hand).
    reference, _ = gradients(method, None, "llama")
    checkpointed, _ = gradients(method, {"use_reentrant": True}, "llama")
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)

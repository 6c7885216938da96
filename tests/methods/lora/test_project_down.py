"""`project_down`: a bf16 input meets fp32 LoRA A without autograd keeping an fp32 copy per adapter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from petune import LoraConfig, get_peft_model
from petune.methods.lora import layer as lora_layer
from petune.methods.lora.project_down import project_down


def saved_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `run()`'s output."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def upcast_then_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight)  # what lora_A(x.float()) does


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_output_and_gradients_as_upcasting(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 4)
    results = []
    for function in (project_down, upcast_then_linear):
        out = function(x, weight)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, weight.grad))
        x.grad, weight.grad = None, None
    (out, grad_x, grad_w), (ref_out, ref_grad_x, ref_grad_w) = results
    assert out.dtype == torch.float32 and torch.equal(out, ref_out)
    assert grad_x is not None and grad_x.dtype == dtype
    torch.testing.assert_close(grad_x, ref_grad_x)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-5)


def test_adapters_sharing_an_input_keep_it_once_in_its_own_dtype() -> None:
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(4, 32, requires_grad=True) for _ in range(3)]  # q, k, v read the same x

    def total(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return sum((function(x, w).sum() for w in weights), torch.zeros(()))

    weight_bytes = sum(w.nbytes for w in weights)
    assert saved_bytes(lambda: total(project_down)) == weight_bytes + x.nbytes  # x once, 2 bytes an element
    assert saved_bytes(lambda: total(upcast_then_linear)) == weight_bytes + 3 * 2 * x.nbytes  # 3 fp32 copies


def test_bf16_lora_model_trains_the_same_and_keeps_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model with fp32 adapters (`petune train --precision bf16` without autocast)."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update (and x's gradient through it) non-trivial
            torch.nn.init.normal_(param)
    ids = torch.randint(0, 64, (2, 12))

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    new_bytes = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)
    new_loss, new_grads = step()
    monkeypatch.setattr(lora_layer, "project_down", upcast_then_linear)
    old_bytes = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)
    old_loss, old_grads = step()
    assert torch.equal(new_loss, old_loss)
    for new, old in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    # per layer: two fp32 copies of the (2 x 12 x 32) input gone, one bf16 x kept instead
    assert old_bytes - new_bytes == config.num_hidden_layers * 2 * 12 * 32 * (2 * 4 - 2)


def test_under_autocast_the_gradients_match_and_the_backward_runs() -> None:
    """bf16-mixed: the forward runs under autocast (bf16 output), the backward without it."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    grads = []
    for function in (project_down, upcast_then_linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = function(x, weight)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads.append((x.grad, weight.grad))
        x.grad, weight.grad = None, None
    (grad_x, grad_w), (ref_grad_x, ref_grad_w) = grads
    assert grad_x is not None and grad_x.dtype == torch.bfloat16 and grad_w is not None
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=2e-2, atol=2e-1)

"""A training forward with `labels=` computes the loss without the full logits (`petune.loss_only`): the same
loss and gradients as the model's own `labels=` loss, logits in evaluation mode and with `return_logits`, and
the model's own forward whenever the call asks for more than the loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from petune import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from petune.loss_only import NO_LOGITS, LossOnlyOutput
from tests.conftest import VOCAB_SIZE, build_batch, build_tiny_model

CONFIGS: dict[str, PeftConfig] = {
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def model(method: str, return_logits: bool = False) -> PeftModel:
    wrapped = get_peft_model(build_tiny_model("llama"), CONFIGS[method]).train()
    wrapped.return_logits = return_logits
    return wrapped


def labelled_batch() -> dict[str, torch.Tensor]:
    """Two rows of 8, the second right-padded; the first 3 tokens are prompt (no label)."""
    batch = build_batch(rows=2, length=8)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :3] = -100
    return {**batch, "labels": labels}


def loss_and_grads(wrapped: PeftModel, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    out = wrapped(**labelled_batch(), **kwargs)
    out.loss.backward()
    return out, {name: p.grad for name, p in wrapped.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_loss_and_gradients_equal_the_full_logits_path(method: str) -> None:
    lean, lean_grads = loss_and_grads(model(method))
    full, full_grads = loss_and_grads(model(method, return_logits=True))

    assert isinstance(lean, LossOnlyOutput) and not isinstance(full, LossOnlyOutput)
    assert full.logits.shape[-1] == VOCAB_SIZE
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert full_grads and lean_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6)


def test_trainers_num_items_in_batch_divides_the_sum_as_the_model_does() -> None:
    lean, lean_grads = loss_and_grads(model("lora"), num_items_in_batch=torch.tensor(20))
    full, full_grads = loss_and_grads(model("lora", return_logits=True), num_items_in_batch=torch.tensor(20))
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6)


def test_reading_the_missing_logits_raises_an_error_naming_the_switch() -> None:
    out = model("lora")(**labelled_batch())
    with pytest.raises(AttributeError, match="return_logits"):
        _ = out.logits
    assert getattr(out, "logits", None) is None
    assert list(out.keys()) == ["loss"] and out[0] is out.loss and NO_LOGITS.startswith("this petune model")


class _FullLogits(TorchDispatchMode):
    """Records whether any operation made a (..., vocab) tensor as large as the (batch, seq, vocab) logits (views,
    such as the head's transposed weight, are not made)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.seen = size, False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in [] if func.is_view else out if isinstance(out, tuple | list) else [out]:
            logits_like = isinstance(tensor, torch.Tensor) and tensor.shape[-1:] == (VOCAB_SIZE,)
            self.seen |= logits_like and tensor.numel() >= self.size
        return out


@pytest.mark.parametrize("return_logits", [False, True])
def test_no_tensor_the_size_of_the_logits_exists_unless_asked_for(return_logits: bool) -> None:
    wrapped = model("lora", return_logits)
    batch = labelled_batch()
    mode = _FullLogits(batch["input_ids"].numel() * VOCAB_SIZE)
    with mode:
        wrapped(**batch).loss.backward()
    assert mode.seen == return_logits


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_evaluation_mode_and_other_outputs_get_the_models_own_forward(method: str) -> None:
    wrapped = model(method)
    batch = labelled_batch()
    reference = model(method, return_logits=True)
    expected = reference(**batch)
    with torch.no_grad():
        evaluated = wrapped.eval()(**batch)
    torch.testing.assert_close(evaluated.logits, expected.logits.detach())
    wrapped.train()
    for extra in ({"output_hidden_states": True}, {"return_dict": False}):
        out = wrapped(**batch, **extra)
        logits = out[1] if isinstance(out, tuple) else out.logits
        assert logits.shape == expected.logits.shape


def test_a_classifier_with_labels_keeps_its_own_loss_and_logits() -> None:
    base = build_tiny_model("llama", task="seq_cls")
    wrapped = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4)).train()
    out = wrapped(**build_batch(), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, base.config.num_labels) and out.loss is not None


def test_the_next_forward_detaches_a_spent_loss_and_keeps_its_value() -> None:
    wrapped, batch = model("lora"), labelled_batch()
    first = wrapped(**batch).loss
    value = first.item()
    first.backward()
    assert first.grad_fn is not None  # the graph's nodes stay with the loss until the next forward
    second = wrapped(**batch).loss
    assert first.grad_fn is None and not first.requires_grad and first.item() == value
    assert second.requires_grad and second.grad_fn is not None
    wrapped.eval()
    wrapped(**batch)  # a forward that returns logits leaves the training loss alone
    assert second.grad_fn is not None


def test_a_graph_not_yet_freed_is_left_alone() -> None:
    wrapped, batch = model("lora"), labelled_batch()
    kept = wrapped(**batch).loss
    kept.backward(retain_graph=True)
    pending = wrapped(**batch).loss  # two forwards before one backward, as accumulation over a sum does
    assert kept.grad_fn is not None
    third = wrapped(**batch).loss
    assert pending.grad_fn is not None and kept.grad_fn is not None
    (kept + pending + third).backward()  # every graph still runs
    wrapped(**batch)
    assert third.grad_fn is None  # the last loss returned, now spent


def test_detach_spent_loss_false_keeps_the_graph() -> None:
    wrapped, batch = model("prefix_tuning"), labelled_batch()
    wrapped.detach_spent_loss = False
    first = wrapped(**batch).loss
    first.backward()
    wrapped(**batch)
    assert first.grad_fn is not None


def test_turning_detach_spent_loss_off_between_steps_keeps_the_last_graph() -> None:
    wrapped, batch = model("lora"), labelled_batch()
    first = wrapped(**batch).loss
    first.backward()
    wrapped.detach_spent_loss = False
    wrapped(**batch)
    assert first.grad_fn is not None

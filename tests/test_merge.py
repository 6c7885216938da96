"""Merging adapters into the weights: merge equals unmerged, unmerge restores, merge_and_unload is a plain model.

References: the unmerged petune model, the untouched base model, and HF PEFT's own `merge_and_unload`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from petune import LoraConfig, PeftModel, get_peft_model
from petune.layers import AdapterLayer

Batch = dict[str, torch.Tensor]

CASES = [
    ("llama", "causal_lm", {}),
    ("llama", "causal_lm", {"use_dora": True}),
    ("qwen2", "causal_lm", {"use_dora": True, "use_rslora": True}),  # q/v projections with a bias
    ("gpt2", "causal_lm", {}),  # Conv1D, weight stored (in, out)
    ("gpt2", "causal_lm", {"use_dora": True}),
    ("bert", "seq_cls", {"use_dora": True}),
]
AUTO = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


def adapted_model(make_model: Callable[..., nn.Module], arch: str, task: str, **kwargs: Any) -> PeftModel:
    """A model with a random (non-zero) adapter; for SEQ_CLS the head copy is changed too."""
    model = make_model(arch, task)
    torch.manual_seed(3)
    task_type = "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM"
    wrapped = get_peft_model(model, LoraConfig(task_type=task_type, r=4, init_lora_weights=False, **kwargs))
    if task == "seq_cls":
        with torch.no_grad():
            head = wrapped.base_model.get_submodule("classifier" if arch == "bert" else "score")
            head.adapters["default"].weight.add_(0.5)
    return wrapped


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


@pytest.mark.parametrize(("arch", "task", "variant"), CASES)
def test_merge_equals_unmerged_and_unmerge_restores(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    arch: str,
    task: str,
    variant: dict[str, Any],
) -> None:
    wrapped = adapted_model(make_model, arch, task, **variant)
    before_weights, adapted = base_weights(wrapped), output_of(wrapped, batch)
    assert not torch.allclose(adapted, output_of(make_model(arch, task), batch), atol=1e-3)
    wrapped.merge_adapter()
    torch.testing.assert_close(output_of(wrapped, batch), adapted, rtol=0, atol=1e-4)
    changed = [n for n, w in base_weights(wrapped).items() if not torch.equal(w, before_weights[n])]
    assert changed, "merging changed no base weight"
    with wrapped.disable_adapter():  # unmerges for the block, merges again after it
        torch.testing.assert_close(
            output_of(wrapped, batch), output_of(make_model(arch, task), batch), rtol=0, atol=1e-5
        )
    torch.testing.assert_close(output_of(wrapped, batch), adapted, rtol=0, atol=1e-4)
    wrapped.unmerge_adapter()
    for name, weight in base_weights(wrapped).items():
        torch.testing.assert_close(weight, before_weights[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(output_of(wrapped, batch), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "task", "variant"), CASES)
def test_merge_and_unload_gives_a_plain_model_that_round_trips(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    tmp_path: Path,
    arch: str,
    task: str,
    variant: dict[str, Any],
) -> None:
    wrapped = adapted_model(make_model, arch, task, **variant)
    adapted = output_of(wrapped, batch)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload()
    assert type(merged) is type(make_model(arch, task))
    assert not [n for n, m in merged.named_modules() if isinstance(m, AdapterLayer)]
    assert not [n for n in merged.state_dict() if "lora_" in n or "base_layer" in n or "adapters" in n]
    merged_output = output_of(merged, batch)
    torch.testing.assert_close(merged_output, adapted, rtol=0, atol=1e-4)

    # HF PEFT merges the same adapter into the same weights.
    reference = peft.PeftModel.from_pretrained(make_model(arch, task), tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(merged_output, output_of(reference, batch), rtol=0, atol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AUTO[task].from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(output_of(reloaded, batch), merged_output, rtol=0, atol=1e-6)


def test_unload_gives_back_the_base_model(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    wrapped = adapted_model(make_model, "llama", "causal_lm", use_dora=True)
    unloaded = wrapped.unload()
    assert unloaded is wrapped.get_base_model()
    assert not [n for n, m in unloaded.named_modules() if isinstance(m, AdapterLayer)]
    assert torch.equal(output_of(unloaded, batch), output_of(make_model("llama"), batch))


def test_merging_two_adapters_adds_their_updates(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    wrapped = adapted_model(make_model, "llama", "causal_lm", target_modules=["q_proj"])
    wrapped.add_adapter("second", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    layer = wrapped.base_model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + sum(layer.adapters[n].delta_weight() for n in ("default", "second"))
    wrapped.merge_adapter(["default", "second"])
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unmerge"):
        wrapped.delete_adapter("second")
    wrapped.unmerge_adapter()
    wrapped.delete_adapter("second")
    wrapped.merge_adapter()
    output = output_of(wrapped, batch)
    wrapped.unmerge_adapter()
    torch.testing.assert_close(output, output_of(wrapped, batch), rtol=0, atol=1e-4)


def test_running_another_adapter_while_one_is_merged_is_refused(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    wrapped = adapted_model(make_model, "llama", "causal_lm")
    wrapped.add_adapter("other", LoraConfig(r=2))
    wrapped.merge_adapter()
    wrapped.set_adapter("other")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        output_of(wrapped, batch)


def test_refused_safe_merge_leaves_every_weight_unmerged(make_model: Callable[..., nn.Module]) -> None:
    wrapped = adapted_model(make_model, "llama", "causal_lm", use_dora=True)
    before = base_weights(wrapped)
    with torch.no_grad():  # the last adapted layer: the layers before it merge fine
        wrapped.base_model.model.layers[1].self_attn.v_proj.adapters["default"].lora_magnitude_vector[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        wrapped.merge_and_unload(safe_merge=True)
    for name, weight in base_weights(wrapped).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-6, msg=name)

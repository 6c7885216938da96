"""Adapter folders move both ways between petune and the real `peft` package, with the same outputs.

For each model, task and LoRA variant: petune saves -> peft loads (and the reverse), and the fp32 outputs
agree to 1e-5; petune's file holds exactly the tensor keys and shapes peft writes for the same config.
Adapters start random (`init_lora_weights=False`) and `modules_to_save` copies are perturbed, so a tensor
that is lost or misplaced changes the output.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from petune import LoraConfig, PeftModel, get_peft_model

Batch = dict[str, torch.Tensor]
TOLERANCE = 1e-5
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "base": "FEATURE_EXTRACTION"}
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
# Modules to save, matched by HF PEFT's suffix rule: "norm" is every RMSNorm of Llama and Qwen2.
SAVED = {"llama": ["norm"], "qwen2": ["norm"], "gpt2": ["ln_f"], "bert": ["embeddings.LayerNorm"]}
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora_rslora": {"use_dora": True, "use_rslora": True},
    "modules_to_save": {"modules_to_save": "SAVED"},
}
MODELS = [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "base")] + [
    (arch, "seq_cls") for arch in ("llama", "qwen2", "gpt2", "bert")
]
MATRIX = [pytest.param(a, t, VARIANTS[v], id=f"{a}-{t}-{v}") for a, t in MODELS for v in VARIANTS]
# Variants beyond the matrix, on one architecture each.
EXTRA = [
    pytest.param("qwen2", "causal_lm", {"bias": "all"}, id="qwen2-bias_all"),
    pytest.param("gpt2", "causal_lm", {"bias": "lora_only", "use_dora": True}, id="gpt2-bias_lora_only"),
    pytest.param("llama", "causal_lm", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}, id="patterns"),
    pytest.param("llama", "causal_lm", {"layers_to_transform": [1], "lora_alpha": 16}, id="layers_to_transform"),
    pytest.param("bert", "seq_cls", {"bias": "all"}, id="bert-seq_cls-bias_all"),
    pytest.param("llama", "causal_lm", {"modules_to_save": ["v_proj"]}, id="modules_to_save_is_a_target"),
    pytest.param("gpt2", "causal_lm", {"target_modules": "all-linear"}, id="gpt2-all_linear"),
    pytest.param("bert", "seq_cls", {"target_modules": "all-linear", "use_dora": True}, id="bert-all_linear"),
]


def config_kwargs(arch: str, task: str, variant: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"task_type": TASK_TYPES[task], "r": 4, "lora_alpha": 8, "init_lora_weights": False}
    kwargs["target_modules"] = TARGETS[arch]
    kwargs.update(variant)
    if kwargs.get("modules_to_save") == "SAVED":
        kwargs["modules_to_save"] = SAVED[arch]
    return kwargs


def perturb_non_lora(model: nn.Module) -> None:
    """Change the trainable tensors LoRA's init leaves equal to the base (head and module copies, biases)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.1 * torch.randn_like(param))


def make_petune(make_model: Callable[..., nn.Module], arch: str, task: str, kwargs: dict[str, Any]) -> PeftModel:
    model = make_model(arch, task)
    torch.manual_seed(11)
    wrapped = get_peft_model(model, LoraConfig(**kwargs))
    perturb_non_lora(wrapped)
    return wrapped


def make_peft(make_model: Callable[..., nn.Module], arch: str, task: str, kwargs: dict[str, Any]) -> Any:
    model = make_model(arch, task)
    torch.manual_seed(12)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    perturb_non_lora(wrapped)
    return wrapped


def saved_tensors(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


def check_petune_to_peft(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    tmp_path: Path,
    arch: str,
    task: str,
    kwargs: dict[str, Any],
) -> float:
    ours = make_petune(make_model, arch, task, kwargs)
    ours_output = output_of(ours, batch)
    assert not torch.allclose(ours_output, output_of(make_model(arch, task), batch), atol=1e-3)
    ours.save_pretrained(tmp_path / "petune")
    make_peft(make_model, arch, task, kwargs).save_pretrained(tmp_path / "peft")
    assert saved_tensors(tmp_path / "petune") == saved_tensors(tmp_path / "peft")
    # Every config field petune writes is one peft knows.
    written = json.loads((tmp_path / "petune" / "adapter_config.json").read_text())
    assert set(written) <= set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))

    loaded = peft.PeftModel.from_pretrained(make_model(arch, task), tmp_path / "petune")
    diff = (output_of(loaded, batch) - ours_output).abs().max().item()
    assert diff <= TOLERANCE
    return diff


def check_peft_to_petune(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    tmp_path: Path,
    arch: str,
    task: str,
    kwargs: dict[str, Any],
) -> float:
    theirs = make_peft(make_model, arch, task, kwargs)
    theirs_output = output_of(theirs, batch)
    theirs.save_pretrained(tmp_path / "from_peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_model(arch, task), tmp_path / "from_peft")
    assert not [str(w.message) for w in caught if "ignor" in str(w.message)]  # no tensor or config field dropped
    diff = (output_of(loaded, batch) - theirs_output).abs().max().item()
    assert diff <= TOLERANCE
    return diff


@pytest.mark.parametrize("direction", ["petune_to_peft", "peft_to_petune"])
@pytest.mark.parametrize(("arch", "task", "variant"), MATRIX + EXTRA)
def test_adapter_moves_between_petune_and_peft(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    tmp_path: Path,
    direction: str,
    arch: str,
    task: str,
    variant: dict[str, Any],
) -> None:
    check = check_petune_to_peft if direction == "petune_to_peft" else check_peft_to_petune
    check(make_model, output_of, batch, tmp_path, arch, task, config_kwargs(arch, task, variant))


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("bert", "seq_cls")])
def test_petune_round_trip(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    tmp_path: Path,
    arch: str,
    task: str,
) -> None:
    kwargs = config_kwargs(arch, task, {"use_dora": True, "modules_to_save": "SAVED"})
    ours = make_petune(make_model, arch, task, kwargs)
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(arch, task), tmp_path)
    assert torch.equal(output_of(loaded, batch), output_of(ours, batch))


def test_second_adapter_goes_to_a_subfolder_both_ways(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch, tmp_path: Path
) -> None:
    kwargs = config_kwargs("llama", "causal_lm", {"use_dora": True})
    ours = make_petune(make_model, "llama", "causal_lm", kwargs)
    torch.manual_seed(13)
    ours.add_adapter("extra", LoraConfig(**kwargs))
    ours.set_adapter("extra")
    ours.save_pretrained(tmp_path / "petune")
    assert (tmp_path / "petune" / "extra" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "petune")
    theirs.load_adapter(tmp_path / "petune" / "extra", adapter_name="extra")
    theirs.set_adapter("extra")
    torch.testing.assert_close(output_of(theirs, batch), output_of(ours, batch), rtol=0, atol=TOLERANCE)

    theirs.save_pretrained(tmp_path / "peft")  # peft's layout: default at the top, "extra" in a subfolder
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "peft", subfolder="extra", adapter_name="extra")
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), rtol=0, atol=TOLERANCE)


def test_plain_module_both_ways(make_mlp: Callable[..., nn.Module], tmp_path: Path) -> None:
    inputs = torch.randn(4, 6)
    kwargs: dict[str, Any] = {"r": 2, "target_modules": ["fc1"], "modules_to_save": ["fc2"], "init_lora_weights": False}
    ours = get_peft_model(make_mlp(), LoraConfig(**kwargs))
    perturb_non_lora(ours)
    ours.save_pretrained(tmp_path / "petune")
    theirs = peft.PeftModel.from_pretrained(make_mlp(), tmp_path / "petune")
    with torch.no_grad():
        torch.testing.assert_close(theirs(inputs), ours(inputs), rtol=0, atol=TOLERANCE)
    theirs = peft.get_peft_model(make_mlp(), peft.LoraConfig(**kwargs))
    perturb_non_lora(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), theirs(inputs), rtol=0, atol=TOLERANCE)

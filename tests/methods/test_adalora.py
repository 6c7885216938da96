"""AdaLoRA against the real `peft`: counts, folders both ways, merging, the regularised loss, and the rank
allocation run side by side with peft's (same start, same steps: same masks, same logits, same files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import petune
from petune import AdaLoraConfig, LoraConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2", "gpt2")
BASE: dict[str, Any] = {"total_step": 10}
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": BASE,
    "ranks": {**BASE, "init_r": 4, "target_r": 2, "lora_alpha": 16, "target_modules": "all-linear"},
    "layers": {
        **BASE,
        "init_r": 3,
        "target_r": 2,
        "target_modules": ["q_proj", "c_fc", "down_proj"],
        "layers_to_transform": [1],
    },
}
SCHEDULE: dict[str, Any] = {
    "task_type": "CAUSAL_LM",  # peft adds the regulariser only under a task wrapper
    "init_r": 6,
    "target_r": 2,
    "tinit": 2,
    "tfinal": 3,
    "total_step": 10,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    """Trainable counts are equal; peft's total also counts its frozen `ranknum` (one number a layer)."""
    ours = get_peft_model(build_tiny_model(arch), AdaLoraConfig(**CONFIGS[config]))
    theirs = peft.get_peft_model(build_tiny_model(arch), peft.AdaLoraConfig(**CONFIGS[config]))
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("AdaLoraConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("AdaLoraConfig", arch, CONFIGS[config], tmp_path / "b")


def test_merge_unmerge_and_merge_and_unload(tmp_path: Path) -> None:
    tuner_checks.check_merge("AdaLoraConfig", "llama", CONFIGS["ranks"], tmp_path)


def _train(model: Any, steps: int, batch: dict[str, torch.Tensor]) -> None:
    """SGD steps on the model's own (regularised) loss, allocating ranks after each, as peft's docs say."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_allocation_matches_peft_step_by_step_and_the_pruned_folders_cross(arch: str, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(build_tiny_model(arch), peft.AdaLoraConfig(**SCHEDULE))
    theirs.save_pretrained(tmp_path / "start")
    ours = petune.PeftModel.from_pretrained(build_tiny_model(arch), tmp_path / "start", is_trainable=True)
    batch = {**build_batch(rows=4, pad=False)}
    batch["labels"] = batch["input_ids"]
    torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss, rtol=0, atol=1e-6)  # regulariser included
    _train(ours, 10, batch)
    _train(theirs, 10, batch)

    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)  # the target budget, target_r per layer
    test_batch = build_batch()
    expected = model_output(ours, test_batch)
    torch.testing.assert_close(expected, model_output(theirs, test_batch), rtol=0, atol=1e-5)

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert tuner_checks.saved_shapes(tmp_path / "ours") == tuner_checks.saved_shapes(tmp_path / "theirs")
    saved_a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in saved_a.items() if k.endswith("lora_A")) == 2 * len(pattern)
    loaded = peft.PeftModel.from_pretrained(build_tiny_model(arch), tmp_path / "ours")
    torch.testing.assert_close(model_output(loaded, test_batch), expected, rtol=0, atol=1e-5)
    back = petune.PeftModel.from_pretrained(build_tiny_model(arch), tmp_path / "theirs")
    torch.testing.assert_close(model_output(back, test_batch), expected, rtol=0, atol=1e-5)
    back.save_pretrained(tmp_path / "again")  # a model built at its kept ranks saves them whole
    assert tuner_checks.saved_shapes(tmp_path / "again") == tuner_checks.saved_shapes(tmp_path / "ours")


def test_budget_schedule_is_cubic_between_tinit_and_tfinal() -> None:
    wrapped = get_peft_model(build_tiny_model("llama"), AdaLoraConfig(**SCHEDULE))
    allocator = wrapped._method.allocator
    budgets = [allocator.budget(step) for step in range(11)]
    assert allocator.initial_budget == 36 and allocator.target_budget == 12  # 6 layers x init_r, x target_r
    assert budgets[:3] == [(36, False)] * 3
    assert budgets[3:8] == [(int(24 * (1 - k / 5) ** 3 + 12), True) for k in range(1, 6)]
    assert budgets[8:] == [(12, True)] * 3


def test_only_one_adapter_trains_and_other_methods_have_no_allocation() -> None:
    wrapped = get_peft_model(build_tiny_model("llama"), AdaLoraConfig(**BASE))
    with pytest.raises(ValueError, match=r"AdaLoRA trains one adapter per model and 'default' trains already"):
        wrapped.add_adapter("other", AdaLoraConfig(**BASE))
    wrapped.add_adapter("other", AdaLoraConfig(**BASE, inference_mode=True))
    lora = get_peft_model(build_tiny_model("llama"), LoraConfig())
    with pytest.raises(TypeError, match=r"update_and_allocate is AdaLoRA's; this model has Lora adapters"):
        lora.update_and_allocate(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"AdaLoraConfig.total_step must be a positive integer \(the training steps\), got None"),
        ({**BASE, "init_r": 0}, r"AdaLoraConfig.init_r must be a positive integer, got 0"),
        ({**BASE, "target_r": 20}, r"AdaLoraConfig.target_r \(20\) must not exceed init_r \(12\)"),
        ({**BASE, "tinit": 6, "tfinal": 4}, r"tinit \(6\) must be below total_step - tfinal \(10 - 4\)"),
        ({**BASE, "deltaT": 0}, r"AdaLoraConfig.deltaT must be a positive integer"),
        ({**BASE, "beta1": 1.0}, r"AdaLoraConfig.beta1 must be in \(0, 1\), got 1.0"),
        ({**BASE, "orth_reg_weight": -1}, r"AdaLoraConfig.orth_reg_weight must be a number >= 0, got -1"),
        ({**BASE, "lora_dropout": 2}, r"AdaLoraConfig.lora_dropout must be in \[0, 1\)"),
        ({**BASE, "bias": "all"}, r"AdaLoraConfig.bias must be 'none'"),
        ({**BASE, "rank_pattern": {"q.lora_E": 3}}, r"AdaLoraConfig.rank_pattern\['q.lora_E'\] must be a list"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**kwargs)


def test_r_is_not_used_and_says_so() -> None:
    with pytest.warns(UserWarning, match=r"AdaLoraConfig.r is not used by AdaLoRA; set init_r"):
        AdaLoraConfig(r=4, **BASE)

"""`petune.hotswap_adapter` against peft's `hotswap_adapter` and against a fresh load: the new adapter's
logits, in the loaded adapter's own tensors (same data pointers, unless the new rank is larger)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

from petune import LoraConfig, PeftModel, get_peft_model, hotswap_adapter
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods.tuner_checks import perturb

ARCH = "llama"
TOLERANCE = 1e-5
ADAPTERS: dict[str, dict[str, Any]] = {
    "old": {"r": 4, "lora_alpha": 8},
    "same_rank": {"r": 4, "lora_alpha": 16},
    "smaller_rank": {"r": 2, "lora_alpha": 3},
    "fewer_targets": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
    "larger_rank": {"r": 8, "lora_alpha": 4},
    "more_targets": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "k_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hotswap")
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        options = {"target_modules": ["q_proj", "v_proj"], **kwargs}
        model = get_peft_model(build_tiny_model(ARCH), LoraConfig(**options))
        perturb(model, seed=seed + 20)
        model.save_pretrained(root / name)
    return root


def pointers(model: PeftModel) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("new", ["same_rank", "smaller_rank", "fewer_targets"])
def test_swapped_in_place_equals_a_fresh_load_and_peft(folders: Path, new: str) -> None:
    model = PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "old")
    before = pointers(model)
    assert len(before) == 8  # A and B of q_proj and v_proj in 2 layers
    old_logits = model_output(model, build_batch())
    hotswap_adapter(model, folders / new, adapter_name="default")
    assert pointers(model) == before
    fresh = model_output(PeftModel.from_pretrained(build_tiny_model(ARCH), folders / new), build_batch())
    swapped = model_output(model, build_batch())
    assert not torch.allclose(swapped, old_logits, atol=1e-4)
    torch.testing.assert_close(swapped, fresh, rtol=0, atol=TOLERANCE)
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "old")
    peft_hotswap_adapter(theirs, str(folders / new), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(swapped, model_output(theirs, build_batch()), rtol=0, atol=TOLERANCE)


def test_a_larger_rank_replaces_the_storage(folders: Path) -> None:
    model = PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "old")
    hotswap_adapter(model, folders / "larger_rank", adapter_name="default")
    fresh = PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "larger_rank")
    torch.testing.assert_close(model_output(model, build_batch()), model_output(fresh, build_batch()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("new", "error", "message"),
    [
        ("more_targets", RuntimeError, "layers the loaded adapter does not adapt"),
        ("rslora", ValueError, "use_rslora=True but the loaded one use_rslora=False"),
    ],
)
def test_incompatible_adapters_change_nothing(folders: Path, new: str, error: type[Exception], message: str) -> None:
    model = PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "old")
    expected = model_output(model, build_batch())
    with pytest.raises(error, match=message):
        hotswap_adapter(model, folders / new, adapter_name="default")
    torch.testing.assert_close(model_output(model, build_batch()), expected, rtol=0, atol=0)


def test_a_merged_adapter_is_refused(folders: Path) -> None:
    model = PeftModel.from_pretrained(build_tiny_model(ARCH), folders / "old")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        hotswap_adapter(model, folders / "same_rank", adapter_name="default")

"""OFT against the real `peft`: counts, folders both ways, merging, mixed batches, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from petune import OFTConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "exact_cayley": {"oft_block_size": 8, "use_cayley_neumann": False, "target_modules": ["k_proj", "down_proj"]},
    "r_shared": {"r": 4, "oft_block_size": 0, "block_share": True, "target_modules": "all-linear"},
    "coft": {"oft_block_size": 16, "coft": True, "eps": 1.0, "num_cayley_neumann_terms": 3},
    "layers": {"oft_block_size": 4, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("OFTConfig", arch, CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("OFTConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("OFTConfig", arch, CONFIGS[config], tmp_path / "b")


def test_petunes_folder_loads_in_peft_without_a_version_warning(tmp_path: Path) -> None:
    import peft

    get_peft_model(build_tiny_model("llama"), OFTConfig()).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(build_tiny_model("llama"), tmp_path)
    assert not [w for w in caught if "cayley" in str(w.message).lower()]


@pytest.mark.parametrize("config", ["defaults", "exact_cayley", "r_shared"])
def test_merge_unmerge_and_merge_and_unload(config: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("OFTConfig", "llama", CONFIGS[config], tmp_path)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("OFTConfig", "qwen2", {"oft_block_size": 8})


def test_starts_as_the_base_model_and_exact_cayley_keeps_weight_norms() -> None:
    """R = I at init; the exact Cayley transform is orthogonal, so each row of W R^T keeps its norm."""
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), OFTConfig(oft_block_size=8, use_cayley_neumann=False))
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))
    tuner_checks.perturb(wrapped, seed=3, scale=1.0)
    layer = wrapped.base_model.model.layers[0].self_attn.q_proj
    rotated = layer.base_weight() @ layer.adapters["default"].matrix().T
    torch.testing.assert_close(rotated.norm(dim=1), layer.base_weight().norm(dim=1))


def test_coft_keeps_each_block_within_its_radius() -> None:
    wrapped = get_peft_model(build_tiny_model("llama"), OFTConfig(oft_block_size=8, coft=True, eps=1e-3))
    tuner_checks.perturb(wrapped, seed=3, scale=1.0)
    model_output(wrapped, build_batch())
    weight = wrapped.base_model.model.layers[0].self_attn.q_proj.adapters["default"].oft_R.weight
    radius = 1e-3 / weight.shape[0] ** 0.5
    assert torch.all(2**0.5 * weight.norm(dim=1) <= radius * (1 + 1e-5))


def test_a_block_size_that_does_not_divide_the_input_moves_to_the_nearest_divisor() -> None:
    with pytest.warns(UserWarning, match=r"oft_block_size=10 does not divide .*q_proj's input size 32; using 8"):
        wrapped = get_peft_model(build_tiny_model("llama"), OFTConfig(oft_block_size=10))
    assert wrapped.base_model.model.layers[0].self_attn.q_proj.adapters["default"].oft_R.weight.shape == (4, 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 4}, r"OFTConfig: set exactly one of r and oft_block_size .* got r=4, oft_block_size=32"),
        ({"oft_block_size": 0}, r"set exactly one of r and oft_block_size"),
        ({"oft_block_size": -2}, r"OFTConfig.oft_block_size must be an integer >= 0, got -2"),
        ({"module_dropout": 1.0}, r"OFTConfig.module_dropout must be in \[0, 1\), got 1.0"),
        ({"eps": 0}, r"OFTConfig.eps must be a positive number, got 0"),
        ({"num_cayley_neumann_terms": 0}, r"OFTConfig.num_cayley_neumann_terms must be a positive integer"),
        ({"coft": "yes"}, r"OFTConfig.coft must be True or False"),
        ({"bias": "oft_only"}, r"OFTConfig.bias must be 'none'"),
        ({"layers_pattern": "layers"}, r"OFTConfig.layers_pattern needs layers_to_transform"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OFTConfig(**kwargs)


def test_gpt2_conv1d_is_refused_naming_the_module_and_the_supported_type() -> None:
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; OFT adapts nn.Linear layers"):
        get_peft_model(build_tiny_model("gpt2"), OFTConfig())

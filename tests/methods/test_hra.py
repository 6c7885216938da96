"""HRA against the real `peft`: counts, folders both ways, merging, mixed batches, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from petune import HRAConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gram_schmidt": {"r": 4, "apply_GS": True, "target_modules": ["k_proj", "down_proj"]},
    "all_linear": {"r": 2, "target_modules": "all-linear"},
    "layers": {"r": 6, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("HRAConfig", arch, CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("HRAConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("HRAConfig", arch, CONFIGS[config], tmp_path / "b")


@pytest.mark.parametrize("config", ["defaults", "gram_schmidt"])
def test_merge_unmerge_and_merge_and_unload(config: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("HRAConfig", "llama", CONFIGS[config], tmp_path)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("HRAConfig", "qwen2", {"r": 4})


def test_starts_as_the_base_model_and_keeps_weight_norms() -> None:
    """Equal pairs of reflections cancel; any chain is orthogonal, so each row of W keeps its norm."""
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), HRAConfig())
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))
    tuner_checks.perturb(wrapped, seed=3, scale=1.0)
    layer = wrapped.base_model.model.layers[0].self_attn.q_proj
    rotated = layer.base_weight() @ layer.adapters["default"].rotation()
    torch.testing.assert_close(rotated.norm(dim=1), layer.base_weight().norm(dim=1))


def test_inits_that_cannot_start_unchanged_warn() -> None:
    with pytest.warns(UserWarning, match="odd r=3 cannot start as the identity; its vectors start random"):
        get_peft_model(build_tiny_model("llama"), HRAConfig(r=3))
    with pytest.warns(UserWarning, match="apply_GS=True and init_weights=True: Gram-Schmidt on the equal pairs"):
        get_peft_model(build_tiny_model("llama"), HRAConfig(r=4, apply_GS=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"HRAConfig.r must be a positive integer, got 0"),
        ({"apply_GS": 1}, r"HRAConfig.apply_GS must be True or False"),
        ({"init_weights": None}, r"HRAConfig.init_weights must be True or False"),
        ({"bias": "hra_only"}, r"HRAConfig.bias must be 'none'"),
        ({"layers_to_transform": "1"}, r"HRAConfig.layers_to_transform must be a layer index or a list"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HRAConfig(**kwargs)


def test_gpt2_conv1d_is_refused_naming_the_module_and_the_supported_type() -> None:
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; HRA adapts nn.Linear layers"):
        get_peft_model(build_tiny_model("gpt2"), HRAConfig())

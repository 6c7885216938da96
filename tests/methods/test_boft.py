"""BOFT against the real `peft`: counts, folders both ways, merging, mixed batches, bad input.

HF PEFT 0.21 builds butterfly factors (boft_n_butterfly_factor > 1) only with its CUDA extension, and falls back to
one factor without it; `peft_butterflies` stands in for that extension (a batched block diagonal, which is all it
computes), so petune's factors are checked against peft's own arithmetic on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from petune import BOFTConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "block_num": {"boft_block_num": 4, "boft_block_size": 0, "target_modules": ["k_proj", "down_proj"]},
    "all_linear": {"boft_block_size": 8, "target_modules": "all-linear"},
    "layers": {"boft_block_size": 2, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
}
BUTTERFLIES: dict[str, dict[str, Any]] = {
    "two": {"boft_n_butterfly_factor": 2},
    "three": {"boft_block_size": 2, "boft_n_butterfly_factor": 3, "target_modules": ["q_proj", "down_proj"]},
    "by_block_num": {"boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": 2},
}


class _BlockDiagonal:
    """What peft's `fbd_cuda` extension computes: (N, D, b, b) -> [(N, D b, D b)] block-diagonal matrices."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*stack.unbind(0)) for stack in blocks])]


@pytest.fixture
def peft_butterflies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagonal())
    yield


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("BOFTConfig", arch, CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("BOFTConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("BOFTConfig", arch, CONFIGS[config], tmp_path / "b")


@pytest.mark.parametrize("config", list(BUTTERFLIES))
def test_butterfly_factors_match_peft_with_its_cuda_extension(
    config: str, tmp_path: Path, peft_butterflies: None
) -> None:
    assert tuner_checks.check_counts("BOFTConfig", "llama", BUTTERFLIES[config]) > 0
    tuner_checks.check_petune_to_peft("BOFTConfig", "llama", BUTTERFLIES[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("BOFTConfig", "llama", BUTTERFLIES[config], tmp_path / "b")


@pytest.mark.parametrize("config", ["defaults", "block_num"])
def test_merge_unmerge_and_merge_and_unload(config: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("BOFTConfig", "llama", CONFIGS[config], tmp_path)


def test_butterfly_merge_equals_unmerged() -> None:
    batch = build_batch()
    ours = tuner_checks.make_petune("BOFTConfig", "llama", BUTTERFLIES["three"])
    expected = model_output(ours, batch)
    ours.merge_adapter()
    torch.testing.assert_close(model_output(ours, batch), expected, rtol=0, atol=1e-5)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("BOFTConfig", "qwen2", {"boft_block_size": 8})


def test_starts_as_the_base_model_and_the_rotation_is_orthogonal() -> None:
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), BOFTConfig(**BUTTERFLIES["three"]))
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))
    tuner_checks.perturb(wrapped, seed=3, scale=1.0)
    rotation = wrapped.base_model.model.layers[0].mlp.down_proj.adapters["default"].matrix()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), rtol=0, atol=1e-5)
    assert (rotation.abs() > 1e-3).float().mean() > 0.05  # three factors of 2 x 2 blocks mix 8 inputs each


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boft_block_num": 4}, r"BOFTConfig: set exactly one of boft_block_size and boft_block_num"),
        ({"boft_block_size": 0}, r"set exactly one of boft_block_size and boft_block_num"),
        ({"boft_block_size": 2.5}, r"BOFTConfig.boft_block_size must be an integer >= 0, got 2.5"),
        ({"boft_n_butterfly_factor": 0}, r"BOFTConfig.boft_n_butterfly_factor must be a positive integer, got 0"),
        ({"boft_dropout": -0.1}, r"BOFTConfig.boft_dropout must be in \[0, 1\)"),
        ({"bias": "boft_only"}, r"BOFTConfig.bias must be 'none'"),
        ({"init_weights": "no"}, r"BOFTConfig.init_weights must be True or False"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boft_block_size": 5}, r"boft_block_size=5 does not divide the input size 32 of model.layers.0.self_attn"),
        (
            {"boft_block_size": 8, "boft_n_butterfly_factor": 4},
            r"boft_n_butterfly_factor=4 needs an even block size whose 2\^3 multiple \(64\) divides the input size 32",
        ),
    ],
)
def test_a_block_layout_the_layer_cannot_take_names_the_layer(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_peft_model(build_tiny_model("llama"), BOFTConfig(**kwargs))


def test_gpt2_conv1d_is_refused_naming_the_module_and_the_supported_type() -> None:
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; BOFT adapts nn.Linear layers"):
        get_peft_model(build_tiny_model("gpt2"), BOFTConfig())

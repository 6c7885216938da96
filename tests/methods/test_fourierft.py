"""FourierFT against the real `peft`: counts, folders both ways, merging, mixed batches, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from petune import FourierFTConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2", "gpt2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {"n_frequency": 100},
    "pattern": {
        "n_frequency": 50,
        "scaling": 20.0,
        "target_modules": "all-linear",
        "n_frequency_pattern": {"v_proj": 7},
    },
    "seed_layers": {
        "n_frequency": 64,
        "random_loc_seed": 5,
        "target_modules": ["k_proj", "c_fc"],
        "layers_to_transform": [1],
    },
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("FourierFTConfig", arch, CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("FourierFTConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("FourierFTConfig", arch, CONFIGS[config], tmp_path / "b")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("FourierFTConfig", arch, {"n_frequency": 100}, tmp_path)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("FourierFTConfig", "llama", {"n_frequency": 100, "random_loc_seed": 1})


def test_zero_init_starts_as_the_base_model() -> None:
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), FourierFTConfig(n_frequency=20, init_weights=True))
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))


def test_too_many_frequencies_names_the_module() -> None:
    with pytest.raises(
        ValueError, match=r"n_frequency=2000 is more than 'model.layers.0.self_attn.q_proj' has weights \(32 x 32\)"
    ):
        get_peft_model(build_tiny_model("llama"), FourierFTConfig(n_frequency=2000))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_frequency": 0}, r"FourierFTConfig.n_frequency must be a positive integer, got 0"),
        ({"scaling": "big"}, r"FourierFTConfig.scaling must be a number"),
        ({"random_loc_seed": None}, r"FourierFTConfig.random_loc_seed must be an integer"),
        ({"bias": "all"}, r"FourierFTConfig.bias must be 'none'"),
        (
            {"n_frequency_pattern": {"q_proj": -1}},
            r"FourierFTConfig.n_frequency_pattern\['q_proj'\] must be a positive",
        ),
        ({"layers_pattern": "layers"}, r"FourierFTConfig.layers_pattern needs layers_to_transform"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FourierFTConfig(**kwargs)


def test_unsupported_module_names_it_and_the_supported_types() -> None:
    with pytest.raises(ValueError, match=r"'model.norm' is a LlamaRMSNorm; FourierFT adapts nn.Linear and Conv1D"):
        get_peft_model(build_tiny_model("llama"), FourierFTConfig(n_frequency=10, target_modules=["q_proj", "norm"]))

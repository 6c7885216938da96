"""VeRA against the real `peft`: counts, folders both ways (with and without the projection), merging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from petune import PeftModel, VeraConfig, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2", "gpt2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {"r": 8},
    "all_linear": {"r": 4, "target_modules": "all-linear", "d_initial": 0.5},
    "layers": {"r": 16, "target_modules": ["k_proj", "up_proj", "c_fc"], "layers_to_transform": [0]},
    "no_projection": {"r": 4, "save_projection": False, "projection_prng_key": 7},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("VeraConfig", arch, CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("VeraConfig", arch, CONFIGS[config], tmp_path / "a")
    tuner_checks.check_peft_to_petune("VeraConfig", arch, CONFIGS[config], tmp_path / "b")


def test_the_projection_in_the_file_is_used(tmp_path: Path) -> None:
    """A file's A and B win over the seed: change them in the file and the loaded outputs follow."""
    ours = tuner_checks.make_petune("VeraConfig", "llama", {"r": 4})
    ours.save_pretrained(tmp_path)
    state = {k: v for k, v in ours.adapter_state_dict("default").items()}
    assert set(state) >= {"base_model.vera_A", "base_model.vera_B"}
    loaded = PeftModel.from_pretrained(build_tiny_model("llama"), tmp_path)
    projection = loaded.adapter_modules["default"]
    torch.testing.assert_close(projection.vera_A, ours.adapter_modules["default"].vera_A)
    with torch.no_grad():
        projection.vera_B.mul_(2)
    assert not torch.allclose(model_output(loaded, build_batch()), model_output(ours, build_batch()), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("VeraConfig", arch, {"r": 8}, tmp_path)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("VeraConfig", "llama", {"r": 8})


def test_starts_as_the_base_model() -> None:
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("gpt2"), VeraConfig(r=4))
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("gpt2"), batch))
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * (96 + 4)  # b (out,) and d (r,) per c_attn


def test_adapters_must_share_seed_and_projection_choice() -> None:
    wrapped = get_peft_model(build_tiny_model("llama"), VeraConfig(r=4))
    with pytest.raises(ValueError, match="same projection_prng_key and save_projection"):
        wrapped.add_adapter("other", VeraConfig(r=4, projection_prng_key=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": -1}, r"VeraConfig.r must be a positive integer, got -1"),
        ({"vera_dropout": 2}, r"VeraConfig.vera_dropout must be in \[0, 1\), got 2"),
        ({"d_initial": None}, r"VeraConfig.d_initial must be a number"),
        ({"projection_prng_key": 1.5}, r"VeraConfig.projection_prng_key must be an integer"),
        ({"save_projection": "true"}, r"VeraConfig.save_projection must be True or False"),
        ({"bias": "all"}, r"VeraConfig.bias must be 'none'"),
        ({"layers_pattern": "layers"}, r"VeraConfig.layers_pattern needs layers_to_transform"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VeraConfig(**kwargs)


def test_unsupported_module_names_it_and_the_supported_types() -> None:
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is a Embedding; Vera adapts nn.Linear and Conv1D"):
        get_peft_model(build_tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))

"""(IA)^3 against the real `peft`: counts, folders both ways, merging, mixed batches, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from petune import IA3Config, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2", "gpt2")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},  # the architecture's targets and feed-forward modules
    "explicit": {"target_modules": ["q_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj"]},
    "all_linear": {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "mlp.c_proj"]},
    "regex": {"target_modules": r".*\.(k_proj|c_attn|down_proj)", "feedforward_modules": r".*down_proj"},
}


def kwargs_for(name: str, arch: str) -> dict[str, Any]:
    kwargs = dict(CONFIGS[name])
    if arch == "gpt2" and name == "explicit":
        kwargs = {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"]}
    return kwargs


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, config: str) -> None:
    tuner_checks.check_counts("IA3Config", arch, kwargs_for(config, arch))


@pytest.mark.parametrize("config", ["defaults", "explicit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, config: str, tmp_path: Path) -> None:
    kwargs = kwargs_for(config, arch)
    tuner_checks.check_petune_to_peft("IA3Config", arch, kwargs, tmp_path / "a")
    tuner_checks.check_peft_to_petune("IA3Config", arch, kwargs, tmp_path / "b")


def test_bert_output_vectors_rescale_the_bias_too(tmp_path: Path) -> None:
    """BERT's layers have biases: an output vector rescales W x + b (and a merge rescales b)."""
    kwargs = {"target_modules": ["query", "value", "output.dense"], "feedforward_modules": ["output.dense"]}
    tuner_checks.check_petune_to_peft("IA3Config", "bert", kwargs, tmp_path / "a", task="base")
    tuner_checks.check_peft_to_petune("IA3Config", "bert", kwargs, tmp_path / "b", task="base")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("IA3Config", arch, {}, tmp_path)


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("IA3Config", "llama", {})


def test_starts_as_the_base_model() -> None:
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), IA3Config())
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, r"feedforward_modules must be a subset"),
        ({"target_modules": 3}, r"IA3Config.target_modules must be a list of module names or a regex"),
        ({"init_ia3_weights": "yes"}, r"IA3Config.init_ia3_weights must be True or False"),
        ({"fan_in_fan_out": 1}, r"IA3Config.fan_in_fan_out must be True or False"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IA3Config(**kwargs)


def test_unsupported_module_names_it_and_the_supported_types() -> None:
    with pytest.raises(ValueError, match=r"'model.norm' is a LlamaRMSNorm; IA3 adapts nn.Linear and Conv1D"):
        get_peft_model(build_tiny_model("llama"), IA3Config(target_modules=["q_proj", "norm"], feedforward_modules=[]))


def test_unknown_architecture_needs_feedforward_modules(make_mlp: Any) -> None:
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules is not set"):
        get_peft_model(make_mlp(), IA3Config(target_modules=["fc1"]))
    wrapped = get_peft_model(make_mlp(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    assert wrapped.get_nb_trainable_parameters()[0] == 16 + 16  # fc1's 16 outputs, fc2's 16 inputs

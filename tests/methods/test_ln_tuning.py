"""LN tuning against the real `peft`: counts, folders both ways, merging (a swap), mixed batches, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from petune import LNTuningConfig, get_peft_model
from tests.conftest import build_tiny_model
from tests.methods import tuner_checks

ARCHS = ("llama", "qwen2", "gpt2")


@pytest.mark.parametrize("kwargs", [{}, {"target_modules": ["norm"]}, {"target_modules": r".*layers\.1\..*norm"}])
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_matches_peft(arch: str, kwargs: dict[str, Any]) -> None:
    if arch == "gpt2" and kwargs:
        kwargs = {"target_modules": ["ln_f"]}
    tuner_checks.check_counts("LNTuningConfig", arch, kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_folders_move_both_ways(arch: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft("LNTuningConfig", arch, {}, tmp_path / "a")
    tuner_checks.check_peft_to_petune("LNTuningConfig", arch, {}, tmp_path / "b")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch: str, tmp_path: Path) -> None:
    tuner_checks.check_merge("LNTuningConfig", arch, {}, tmp_path)


def test_merging_two_adapters_is_refused_with_nothing_merged() -> None:
    wrapped = tuner_checks.make_petune("LNTuningConfig", "llama", {})
    wrapped.add_adapter("other", LNTuningConfig())
    with pytest.raises(ValueError, match="LN tuning merges one adapter at a time"):
        wrapped.merge_adapter(["default", "other"])
    wrapped.merge_adapter(["default"])
    with pytest.raises(ValueError, match="LN tuning merges one adapter at a time"):
        wrapped.merge_adapter(["other"])
    assert wrapped._merged == ["default"]


def test_mixed_batch() -> None:
    tuner_checks.check_mixed_batch("LNTuningConfig", "llama", {})


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"LNTuningConfig.target_modules must be a list of module names or a regex"):
        LNTuningConfig(target_modules=[1])


def test_unknown_architecture_needs_target_modules(make_mlp: Any) -> None:
    with pytest.raises(ValueError, match=r"target_modules is not set and petune has no LNTuning default"):
        get_peft_model(make_mlp(), LNTuningConfig())
    with pytest.raises(ValueError, match=r"matched no layer of LlamaForCausalLM; its normalisation layers are: .*norm"):
        get_peft_model(build_tiny_model("llama"), LNTuningConfig(target_modules=["layernorm_x"]))

"""LoHa and LoKr against the real `peft`: counts, folders both ways, merging, mixed batches, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization

import petune
from petune import LoHaConfig, LoKrConfig, get_peft_model
from petune.methods.lokr import factorization
from petune.methods.lycoris import LycorisAdapter
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods import tuner_checks

METHODS = ("LoHaConfig", "LoKrConfig")
ARCHS = ("llama", "qwen2")
COMMON: dict[str, dict[str, Any]] = {
    "defaults": {"r": 4},
    "patterns": {"r": 4, "target_modules": "all-linear", "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
    "layers": {"r": 2, "alpha": 5, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
}
LOKR: dict[str, dict[str, Any]] = {
    "decompose_both": {"r": 1, "decompose_both": True, "target_modules": ["gate_proj", "o_proj"]},
    "decompose_factor": {"r": 16, "decompose_factor": 4, "target_modules": ["up_proj", "k_proj"]},
    "lycoris_init": {"r": 8, "init_weights": "lycoris"},
}
CASES = [pytest.param(m, c, COMMON[c], id=f"{m}-{c}") for m in METHODS for c in COMMON] + [
    pytest.param("LoKrConfig", c, kwargs, id=f"LoKrConfig-{c}") for c, kwargs in LOKR.items()
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "case", "kwargs"), CASES)
def test_trainable_count_matches_peft(method: str, case: str, kwargs: dict[str, Any], arch: str) -> None:
    tuner_checks.check_counts(method, arch, kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "case", "kwargs"), CASES)
def test_folders_move_both_ways(method: str, case: str, kwargs: dict[str, Any], arch: str, tmp_path: Path) -> None:
    tuner_checks.check_petune_to_peft(method, arch, kwargs, tmp_path / "a")
    tuner_checks.check_peft_to_petune(method, arch, kwargs, tmp_path / "b")


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_merge_and_unload(method: str, tmp_path: Path) -> None:
    tuner_checks.check_merge(method, "llama", {"r": 4, "target_modules": "all-linear"}, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch(method: str) -> None:
    tuner_checks.check_mixed_batch(method, "qwen2", {"r": 4})


@pytest.mark.parametrize("method", METHODS)
def test_starts_as_the_base_model(method: str) -> None:
    batch = build_batch()
    wrapped = get_peft_model(build_tiny_model("llama"), getattr(petune, method)(r=4))
    torch.testing.assert_close(model_output(wrapped, batch), model_output(build_tiny_model("llama"), batch))


@pytest.mark.parametrize("method", METHODS)
def test_dropouts_act_in_training_only(method: str) -> None:
    """module_dropout=0.99 skips the update in (almost) every training pass, never in eval; rank dropout too."""
    torch.manual_seed(0)
    wrapped = tuner_checks.make_petune(method, "llama", {"r": 4, "module_dropout": 0.99, "rank_dropout": 0.5})
    batch = build_batch()
    adapted = model_output(wrapped, batch)  # the tiny model is in eval mode, and so are the new adapters
    wrapped.train()
    with wrapped.disable_adapter():
        base = model_output(wrapped, batch)
    torch.testing.assert_close(model_output(wrapped, batch), base)
    wrapped.eval()
    torch.testing.assert_close(model_output(wrapped, batch), adapted)
    for adapter in wrapped.modules():
        if isinstance(adapter, LycorisAdapter):
            adapter.module_dropout = 0.0  # now rank dropout alone: some rows of each update are dropped
    wrapped.train()
    dropped = model_output(wrapped, batch)
    assert not torch.allclose(dropped, base, atol=1e-4) and not torch.allclose(dropped, adapted, atol=1e-4)


def test_factorization_matches_peft() -> None:
    for dimension in [1, 2, 7, 16, 32, 48, 96, 127, 128, 576, 1536, 4096, 11008]:
        for factor in [-1, 1, 3, 4, 6, 16, 100]:
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (LoHaConfig, {"r": 0}, r"LoHaConfig.r must be a positive integer, got 0"),
        (LoKrConfig, {"alpha": "8"}, r"LoKrConfig.alpha must be a number"),
        (LoHaConfig, {"rank_dropout": 1.0}, r"LoHaConfig.rank_dropout must be in \[0, 1\), got 1.0"),
        (LoKrConfig, {"module_dropout": -0.1}, r"LoKrConfig.module_dropout must be in \[0, 1\)"),
        (LoHaConfig, {"init_weights": "lycoris"}, r"LoHaConfig.init_weights must be True or False"),
        (LoKrConfig, {"init_weights": "pissa"}, r"LoKrConfig.init_weights must be True, False or 'lycoris'"),
        (LoKrConfig, {"decompose_factor": 0}, r"LoKrConfig.decompose_factor must be -1 or a positive integer"),
        (LoKrConfig, {"decompose_both": "no"}, r"LoKrConfig.decompose_both must be True or False"),
        (LoHaConfig, {"rank_pattern": {"q_proj": 0}}, r"LoHaConfig.rank_pattern\['q_proj'\] must be a positive"),
        (LoHaConfig, {"layers_to_transform": [0], "target_modules": ".*q"}, r"layers_to_transform needs a list"),
    ],
)
def test_bad_config_names_the_field(config: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d_is_refused_naming_the_module_and_the_supported_type(method: str) -> None:
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; Lo[HK][ar] adapts nn.Linear"):
        get_peft_model(build_tiny_model("gpt2"), getattr(petune, method)(r=4))

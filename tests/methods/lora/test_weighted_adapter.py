"""`add_weighted_adapter` against the real peft: the same source adapters, combined with the same arguments,
give the same combined tensors (file keys and values) and the same logits.

The DARE rules draw random masks with `torch.bernoulli`; petune draws them in peft's order (layers in
module order, per layer the A's then the B's, or the full updates for `*_svd`), so with the same
`torch.manual_seed` before the call both keep the same entries and the tensors are compared exactly too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

from petune import LoraConfig, PeftModel, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods.tuner_checks import perturb

ARCH = "llama"
SOURCES = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 4, "lora_alpha": 16}, "c": {"r": 2, "lora_alpha": 2}}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three perturbed LoRA adapters (ranks 4, 4, 2) saved by petune into one folder."""
    root = tmp_path_factory.mktemp("sources")
    for seed, (name, kwargs) in enumerate(SOURCES.items()):
        config = LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs)
        model = get_peft_model(build_tiny_model(ARCH), config)
        perturb(model, seed=seed + 3)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def both(sources: Path) -> tuple[Any, Any]:
    """(petune, peft) models, each with the three source adapters loaded."""
    ours = PeftModel.from_pretrained(build_tiny_model(ARCH), sources / "a", adapter_name="a")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(ARCH), sources / "a", adapter_name="a")
    for name in ("b", "c"):
        ours.load_adapter(sources / name, adapter_name=name)
        theirs.load_adapter(sources / name, adapter_name=name)
    return ours, theirs


def combined_files(model: Any, name: str, directory: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(directory, selected_adapters=[name])
    return load_file(directory / name / "adapter_model.safetensors")


CASES = [
    ("linear", ["a", "b"], {}),
    ("linear", ["a"], {}),
    ("cat", ["a", "c"], {}),
    ("svd", ["a", "c"], {}),
    ("svd", ["a", "b"], {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", ["a", "b"], {"density": 0.5}),
    ("ties", ["a", "b"], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["a", "b"], {"density": 0.3}),
    ("dare_linear", ["a", "b"], {"density": 0.5}),
    ("dare_ties", ["a", "b"], {"density": 0.7}),
    ("ties_svd", ["a", "c"], {"density": 0.5}),
    ("magnitude_prune_svd", ["a", "c"], {"density": 0.5}),
    ("dare_linear_svd", ["a", "c"], {"density": 0.5}),
    ("dare_ties_svd", ["a", "c"], {"density": 0.5}),
]


@pytest.mark.parametrize(("combination_type", "adapters", "options"), CASES)
def test_combined_adapter_matches_peft(
    both: tuple[Any, Any], tmp_path: Path, combination_type: str, adapters: list[str], options: dict[str, Any]
) -> None:
    ours, theirs = both
    name = f"mix_{combination_type}_{len(adapters)}_{len(options)}_{options.get('majority_sign_method', '')}"
    weights = [0.7, -0.4][: len(adapters)]
    for model in (ours, theirs):
        torch.manual_seed(1234)
        model.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, **options)
    expected = combined_files(theirs, name, tmp_path / "peft")
    written = combined_files(ours, name, tmp_path / "petune")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=TOLERANCE, msg=key)
    assert any(t.abs().sum() > 0 for t in written.values())
    for model in (ours, theirs):
        model.set_adapter(name)
    batch = build_batch()
    logits = model_output(ours, batch)
    assert not torch.allclose(logits, model_output(build_tiny_model(ARCH), batch), atol=1e-4)
    torch.testing.assert_close(logits, model_output(theirs, batch), rtol=0, atol=TOLERANCE)


def test_cat_is_the_exact_weighted_sum(both: tuple[Any, Any]) -> None:
    """`cat`'s B A equals sum_i w_i s_i B_i A_i in every layer (unlike `linear`, which is approximate)."""
    ours, _ = both
    ours.add_weighted_adapter(["a", "c"], [0.5, 2.0], "cat_exact", "cat")  # peft's positional order
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.adapters["a"].delta_weight() + 2.0 * layer.adapters["c"].delta_weight()
    torch.testing.assert_close(layer.adapters["cat_exact"].delta_weight(), expected)
    assert layer.adapters["cat_exact"].r == 6


@pytest.mark.parametrize(
    ("adapters", "options", "message"),
    [
        (["a", "c"], {"combination_type": "linear"}, "same rank"),
        (["a", "b"], {"combination_type": "bogus"}, "unknown combination_type 'bogus'"),
        (["a", "b"], {"combination_type": "ties"}, "pass density="),
        (["a", "nope"], {}, "no adapter named 'nope'"),
        (["a", "b"], {"combination_type": "svd", "svd_rank": 999}, "svd_rank=999"),
    ],
)
def test_bad_arguments_are_clear(
    both: tuple[Any, Any], adapters: list[str], options: dict[str, Any], message: str
) -> None:
    ours, _ = both
    names = set(ours.peft_config)
    with pytest.raises(ValueError, match=message):
        ours.add_weighted_adapter(adapters, [1.0, 1.0], "bad", **options)
    assert set(ours.peft_config) == names


@pytest.mark.parametrize("combination_type", ["svd", "cat", "linear"])
def test_gpt2_conv1d_layers_match_peft(tmp_path: Path, combination_type: str) -> None:
    """GPT-2's `Conv1D` stores weights as (in, out): the combined adapter still equals peft's."""
    models = []
    for seed, alpha in ((30, 8), (31, 4)):
        model = get_peft_model(build_tiny_model("gpt2"), LoraConfig(r=4, lora_alpha=alpha, target_modules=["c_attn"]))
        perturb(model, seed=seed)
        model.save_pretrained(tmp_path / f"src{seed}")
        models.append(tmp_path / f"src{seed}")
    ours = PeftModel.from_pretrained(build_tiny_model("gpt2"), models[0], adapter_name="a")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model("gpt2"), models[0], adapter_name="a")
    for model in (ours, theirs):
        model.load_adapter(models[1], adapter_name="b")
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type=combination_type)
        model.set_adapter("mix")
    expected = combined_files(theirs, "mix", tmp_path / "peft")
    written = combined_files(ours, "mix", tmp_path / "petune")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=TOLERANCE, msg=key)
    batch = build_batch()
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), rtol=0, atol=TOLERANCE)

"""Checks every layer-wrapping method runs against the real `peft`: counts, files both ways, merging, mixing.

A method's test file calls these with its config class name (the same in petune and peft) and kwargs.
Adapters are perturbed after creation (`perturb`), so a tensor that is lost, misplaced or mis-shaped
changes the output; each check first asserts the adapter does change the output.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file
from torch import nn

import petune
from petune import PeftModel, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output

TOLERANCE = 1e-5


def perturb(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add scale * N(0, 1) to every trainable tensor, deterministically from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


def make_petune(config_name: str, arch: str, kwargs: dict[str, Any], seed: int = 11, task: str = "causal_lm") -> Any:
    wrapped = get_peft_model(build_tiny_model(arch, task), getattr(petune, config_name)(**kwargs))
    perturb(wrapped, seed)
    return wrapped


def make_peft(config_name: str, arch: str, kwargs: dict[str, Any], seed: int = 12, task: str = "causal_lm") -> Any:
    wrapped = peft.get_peft_model(build_tiny_model(arch, task), getattr(peft, config_name)(**kwargs))
    perturb(wrapped, seed)
    return wrapped


def check_counts(config_name: str, arch: str, kwargs: dict[str, Any]) -> int:
    """petune trains exactly as many parameters as peft for the same config (and at least one)."""
    ours = get_peft_model(build_tiny_model(arch), getattr(petune, config_name)(**kwargs))
    theirs = peft.get_peft_model(build_tiny_model(arch), getattr(peft, config_name)(**kwargs))
    counts = ours.get_nb_trainable_parameters()
    assert counts == theirs.get_nb_trainable_parameters()
    assert counts[0] > 0
    return counts[0]


def saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


def changed_output(model: nn.Module, arch: str, task: str) -> torch.Tensor:
    """`model`'s output on the test batch, checked to differ from the base model's."""
    batch = build_batch()
    output = model_output(model, batch)
    assert not torch.allclose(output, model_output(build_tiny_model(arch, task), batch), atol=1e-3)
    return output


def check_petune_to_peft(
    config_name: str, arch: str, kwargs: dict[str, Any], tmp_path: Path, task: str = "causal_lm"
) -> None:
    """petune's folder: peft's tensor keys and shapes, config fields peft knows, and peft's outputs."""
    ours = make_petune(config_name, arch, kwargs, task=task)
    expected = changed_output(ours, arch, task)
    ours.save_pretrained(tmp_path / "petune")
    make_peft(config_name, arch, kwargs, task=task).save_pretrained(tmp_path / "peft")
    assert saved_shapes(tmp_path / "petune") == saved_shapes(tmp_path / "peft")
    written = json.loads((tmp_path / "petune" / "adapter_config.json").read_text())
    assert set(written) <= set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    loaded = peft.PeftModel.from_pretrained(build_tiny_model(arch, task), tmp_path / "petune")
    torch.testing.assert_close(model_output(loaded, build_batch()), expected, rtol=0, atol=TOLERANCE)


def check_peft_to_petune(
    config_name: str, arch: str, kwargs: dict[str, Any], tmp_path: Path, task: str = "causal_lm"
) -> None:
    """peft's folder loads into petune with nothing ignored and the same outputs."""
    theirs = make_peft(config_name, arch, kwargs, task=task)
    expected = changed_output(theirs, arch, task)
    theirs.save_pretrained(tmp_path / "from_peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(build_tiny_model(arch, task), tmp_path / "from_peft")
    assert not [str(w.message) for w in caught if "ignor" in str(w.message)]
    torch.testing.assert_close(model_output(loaded, build_batch()), expected, rtol=0, atol=TOLERANCE)


def check_merge(config_name: str, arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Merged output = unmerged output; unmerge restores the weights; merge_and_unload matches peft's."""
    batch = build_batch()
    ours = make_petune(config_name, arch, kwargs)
    before = {k: v.clone() for k, v in ours.base_model.state_dict().items()}
    expected = model_output(ours, batch)
    ours.merge_adapter()
    torch.testing.assert_close(model_output(ours, batch), expected, rtol=0, atol=TOLERANCE)
    ours.unmerge_adapter()
    for key, value in ours.base_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(arch), tmp_path).merge_and_unload()
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, petune.layers.AdapterLayer) for m in merged.modules())
    assert {k for k, _ in merged.named_parameters()} == {k for k, _ in theirs.named_parameters()}
    torch.testing.assert_close(model_output(merged, batch), model_output(theirs, batch), rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(model_output(merged, batch), expected, rtol=0, atol=TOLERANCE)


def check_mixed_batch(config_name: str, arch: str, kwargs: dict[str, Any]) -> None:
    """Each row of a mixed batch gets exactly its own adapter's (or the base model's) output."""
    batch = build_batch(rows=3)
    ours = make_petune(config_name, arch, kwargs)
    ours.add_adapter("other", getattr(petune, config_name)(**kwargs))
    perturb(ours, seed=13)  # "other" is not trainable: perturb it directly below
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".other." in name:
                param.add_(0.1 * torch.randn_like(param))
    names = ["default", "other", petune.BASE_ADAPTER]
    mixed = model_output(ours, batch, adapter_names=names)
    expected = []
    for row, name in enumerate(names):
        if name == petune.BASE_ADAPTER:
            with ours.disable_adapter():
                expected.append(model_output(ours, batch)[row])
        else:
            ours.set_adapter(name)
            expected.append(model_output(ours, batch)[row])
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=0, atol=TOLERANCE)

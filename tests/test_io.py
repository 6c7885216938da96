"""The adapter folder: what `save_pretrained` writes, and how `from_pretrained` treats bad or foreign input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from petune import LoraConfig, PeftModel, get_peft_model

Batch = dict[str, torch.Tensor]


def random_lora(make_model: Callable[..., nn.Module], arch: str = "llama", **kwargs: object) -> PeftModel:
    model = make_model(arch)
    torch.manual_seed(5)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, **kwargs))  # type: ignore[arg-type]


def test_save_writes_hf_peft_files(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    wrapped = random_lora(make_model, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"])
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {f"{layer}.lora_A.weight", f"{layer}.lora_B.weight", f"{layer}.lora_magnitude_vector"} <= set(tensors)
    assert "base_model.model.lm_head.weight" in tensors
    assert not [k for k in tensors if ".default." in k or "adapters" in k or "base_layer" in k]
    live = wrapped.base_model.get_submodule(layer.removeprefix("base_model.model.")).adapters["default"]
    assert torch.equal(tensors[f"{layer}.lora_B.weight"], live.lora_B.weight)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and config["use_dora"] is True
    assert wrapped.peft_config["default"].inference_mode is False  # saving does not freeze the live adapter


def test_saving_skips_non_main_processes_and_refuses_pickle(
    make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    wrapped = random_lora(make_model)
    wrapped.save_pretrained(tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        wrapped.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_selected_adapters_and_subfolders(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    wrapped = random_lora(make_model)
    wrapped.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    wrapped.save_pretrained(tmp_path / "only_other", selected_adapters=["other"])
    assert sorted(p.name for p in (tmp_path / "only_other").iterdir()) == ["other"]
    with pytest.raises(FileNotFoundError, match=r"subfolders: other \(pass subfolder=NAME\)"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "only_other")
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "only_other", subfolder="other")
    assert loaded.peft_config["default"].target_modules == ["k_proj"]


def test_load_adapter_then_set_adapter(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch, tmp_path: Path
) -> None:
    first, second = random_lora(make_model), random_lora(make_model, use_dora=True, lora_alpha=32)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "first")
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert loaded.active_adapter == "default"
    assert torch.equal(output_of(loaded, batch), output_of(first, batch))
    loaded.set_adapter("second")
    assert torch.equal(output_of(loaded, batch), output_of(second, batch))


def test_missing_folder_or_weights_name_the_path(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "nowhere")
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match=r"config_only.*adapter_model\.safetensors"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "config_only")


def test_adapter_for_another_base_model_names_the_tensor_and_shapes(
    make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    random_lora(make_model, target_modules=["q_proj"]).save_pretrained(tmp_path)
    wider = make_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\).*\(4, 48\)"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_missing_and_extra_tensors(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    random_lora(make_model).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.something.new"] = torch.zeros(2)
    save_file(tensors, weights)
    with pytest.warns(UserWarning, match=r"ignored 1 tensors.*something\.new"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_pickle_needs_an_explicit_opt_in(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch, tmp_path: Path
) -> None:
    model = make_model("llama")
    torch.manual_seed(5)
    reference = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle file.*allow_pickle=True"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, allow_pickle=True)
    torch.testing.assert_close(output_of(loaded, batch), output_of(reference, batch), rtol=0, atol=1e-6)


def test_unknown_config_fields_warn_but_load(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch, tmp_path: Path
) -> None:
    wrapped = random_lora(make_model)
    wrapped.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_future_feature"] = {"enabled": True}
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="lora_future_feature"):
        loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(output_of(loaded, batch), output_of(wrapped, batch))


def test_save_leaves_no_temporary_files(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    wrapped = random_lora(make_model)
    wrapped.save_pretrained(tmp_path)
    wrapped.save_pretrained(tmp_path)  # overwriting an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

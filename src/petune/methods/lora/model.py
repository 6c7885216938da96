"""Attaching LoRA to a model: find the target layers, wrap them, merge them back."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from petune import targets
from petune.config import PeftConfig
from petune.layers import ModulesToSave, adapter_layers, replace_module
from petune.methods.base import Method
from petune.methods.lora.config import LoraConfig
from petune.methods.lora.layer import LoraLayer


class Lora(Method):
    """LoRA, rsLoRA and DoRA on `nn.Linear` and `Conv1D` layers."""

    config_class = LoraConfig

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.bias_adapter: str | None = None  # the one adapter that may train biases (they are shared)

    def add(self, name: str, config: PeftConfig) -> None:
        assert isinstance(config, LoraConfig)
        if config.bias != "none":
            existing = {n for _, layer in adapter_layers(self.model) for n in layer.adapters}
            if self.bias_adapter in existing:
                raise ValueError(
                    f"adapter {self.bias_adapter!r} already trains biases (bias != 'none'), and biases are shared "
                    f"by all adapters: give adapter {name!r} bias='none', as HF PEFT requires"
                )
            self.bias_adapter = name
        if config.target_modules is None:
            config.target_modules = targets.default_target_modules(self.model)
        found = self.target_names(config)
        if config.target_modules == targets.ALL_LINEAR:
            # HF PEFT saves the qualified names it picked, so the file names exactly these layers.
            config.target_modules = sorted(found)
        for module_name in found:
            self._add_to(module_name, name, config)
        self._set_bias_trainable(name, config)
        return None

    def target_names(self, config: LoraConfig) -> list[str]:
        """Qualified names of the layers `config` adapts, or an error listing the candidates."""
        assert config.target_modules is not None
        skip = targets.output_layer_names(self.model) if config.target_modules == targets.ALL_LINEAR else set()
        wrapped = [n for n, m in adapter_layers(self.model)]
        found = []
        for module_name, module in self.model.named_modules():
            inside_wrapper = any(module_name.startswith(f"{w}.") for w in wrapped)
            if module_name and not inside_wrapper and self._is_target(module_name, module, config, skip):
                found.append(module_name)
        if not found:
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no layer of {type(self.model).__name__}; "
                f"its linear layers are: {', '.join(targets.linear_layer_names(self.model))}"
            )
        return found

    def _is_target(self, module_name: str, module: nn.Module, config: LoraConfig, skip: set[str]) -> bool:
        if config.exclude_modules and targets.matches(config.exclude_modules, module_name):
            return False
        if config.modules_to_save and targets.is_in_module_to_save(config.modules_to_save, module_name):
            return False
        if isinstance(module, ModulesToSave) or module_name in skip:
            return False
        assert config.target_modules is not None
        if config.target_modules == targets.ALL_LINEAR:
            hit = targets.is_linear(module) or isinstance(module, LoraLayer)
        else:
            hit = targets.matches(config.target_modules, module_name)
        if hit and config.layers_to_transform is not None:
            assert isinstance(config.layers_to_transform, list)
            hit = targets.layer_index(module_name, config.layers_pattern) in config.layers_to_transform
        if hit and not (targets.is_linear(module) or isinstance(module, LoraLayer)):
            raise ValueError(
                f"target module {module_name!r} is a {type(module).__name__}; LoRA adapts nn.Linear and "
                f"Conv1D layers: narrow target_modules to {', '.join(targets.linear_layer_names(self.model))}"
            )
        return hit

    def _add_to(self, module_name: str, name: str, config: LoraConfig) -> None:
        module = self.model.get_submodule(module_name)
        if not isinstance(module, LoraLayer):
            fan_in_fan_out = config.fan_in_fan_out
            if isinstance(module, Conv1D) and not fan_in_fan_out:
                warnings.warn(
                    f"{module_name} is a Conv1D (weight stored as in x out); setting fan_in_fan_out=True",
                    stacklevel=4,
                )
                fan_in_fan_out = config.fan_in_fan_out = True
            module = LoraLayer(module, fan_in_fan_out)
            replace_module(self.model, module_name, module)
        rank_key = targets.pattern_key(list(config.rank_pattern), module_name)
        alpha_key = targets.pattern_key(list(config.alpha_pattern), module_name)
        r = config.rank_pattern[rank_key] if rank_key else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key else config.lora_alpha
        module.add(name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, config.init_lora_weights)

    def _set_bias_trainable(self, name: str, config: LoraConfig) -> None:
        for param in self._bias_params(name, config).values():
            param.requires_grad_(not config.inference_mode)

    def _bias_params(self, name: str, config: PeftConfig) -> dict[str, nn.Parameter]:
        """The biases `bias="all"` / `"lora_only"` train, under HF PEFT's names (without the file prefix)."""
        bias = getattr(config, "bias", "none")
        if bias == "all":
            saved = [n for n, m in adapter_layers(self.model) if isinstance(m, ModulesToSave)]
            found = {}
            for param_name, param in self.model.named_parameters():
                key = _hf_module_to_save_key(param_name, saved, name)
                if key is not None and (key == "bias" or key.endswith(".bias")):
                    found[key] = param
            return found
        if bias == "lora_only":
            return {
                f"{n}.base_layer.bias": m.base_layer.bias  # type: ignore[misc]
                for n, m in adapter_layers(self.model)
                if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None
            }
        return {}

    def state_dict(self, name: str, config: PeftConfig, module: nn.Module | None) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{n}": p for n, p in self._bias_params(name, config).items()}

    def load_state_dict(
        self, name: str, config: PeftConfig, module: nn.Module | None, state_dict: dict[str, torch.Tensor]
    ) -> set[str]:
        consumed = set()
        with torch.no_grad():
            for param_name, param in self._bias_params(name, config).items():
                key = f"base_model.model.{param_name}"
                if key in state_dict:
                    param.copy_(state_dict[key])
                    consumed.add(key)
        return consumed

    def merge(self, names: list[str], safe_merge: bool) -> None:
        for _, layer in adapter_layers(self.model):
            if isinstance(layer, LoraLayer):
                for name in names:
                    if name in layer.adapters:
                        layer.merge(name, safe_merge)

    def unmerge(self) -> None:
        for _, layer in adapter_layers(self.model):
            if isinstance(layer, LoraLayer):
                layer.unmerge()

    @property
    def supports_mixed_batch(self) -> bool:
        return True


def _hf_module_to_save_key(param_name: str, saved: list[str], adapter_name: str) -> str | None:
    """HF PEFT's name for a parameter inside a `modules_to_save` module; None for another adapter's copy.

    HF PEFT keeps the original as `original_module` and the copies as `modules_to_save.<adapter>`;
    `bias="all"` saves the biases of both under those names (the adapter name removed).
    """
    for module_name in saved:
        if param_name.startswith(f"{module_name}.base_layer."):
            return f"{module_name}.original_module.{param_name.removeprefix(f'{module_name}.base_layer.')}"
        if param_name.startswith(f"{module_name}.adapters."):
            owner, _, rest = param_name.removeprefix(f"{module_name}.adapters.").partition(".")
            return f"{module_name}.modules_to_save.{rest}" if owner == adapter_name else None
    return param_name

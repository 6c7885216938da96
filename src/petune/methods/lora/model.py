"""Attaching LoRA to a model: find the target layers, wrap them, merge them back."""

from __future__ import annotations

import torch
from torch import nn

from petune.config import PeftConfig
from petune.layers import ModulesToSave, adapter_layers
from petune.methods.lora.config import LoraConfig
from petune.methods.lora.layer import LoraLayer
from petune.methods.lora.trainable_tokens import (
    add_token_rows,
    check_token_rows_mergeable,
    merge_token_rows,
    unmerge_token_rows,
)
from petune.methods.tuner import LayerTuner, per_module


class Lora(LayerTuner):
    """LoRA, rsLoRA and DoRA on `nn.Linear` and `Conv1D` layers."""

    config_class = LoraConfig
    layer_class = LoraLayer

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
        super().add(name, config)
        self._set_bias_trainable(name, config)
        if config.trainable_token_indices is not None:
            add_token_rows(self.model, name, config.trainable_token_indices, config.modules_to_save)
        return None

    def merge(self, names: list[str], safe_merge: bool) -> None:
        check_token_rows_mergeable(self.model, names)
        super().merge(names, safe_merge)
        merge_token_rows(self.model, names)

    def unmerge(self) -> None:
        super().unmerge()
        unmerge_token_rows(self.model)

    def add_to_layer(self, layer: LoraLayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, LoraConfig)
        r = per_module(config.rank_pattern, module_name, config.r)
        alpha = per_module(config.alpha_pattern, module_name, config.lora_alpha)
        layer.add(name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, config.init_lora_weights)

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

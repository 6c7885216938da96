"""`LayerTuner`: the part every layer-wrapping method shares (LoRA, IA3, LoHa, LoKr, VeRA, LN tuning).

Such a method finds its target modules by HF PEFT's rules (`targets`), wraps each in its `AdapterLayer`
subclass and lets the layer hold one adapter per name. A method package then only says which module
types it adapts, what its layer computes and, if it has any, how to merge it.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from petune import targets
from petune.config import PeftConfig
from petune.layers import AdapterLayer, ModulesToSave, adapter_layers, replace_module
from petune.methods.base import Method


class LayerTuner(Method):
    """Wraps the modules `config.target_modules` names in `layer_class` and adds an adapter to each.

    Subclasses set `layer_class`, `supported_types` (the module types the method can adapt) and
    `default_targets` (per model type, HF PEFT's table for the method), and implement `new_layer`.
    """

    layer_class: type[AdapterLayer] = AdapterLayer
    supported_types: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
    supported_type_names = "nn.Linear and Conv1D"
    default_targets: dict[str, list[str]] = targets.DEFAULT_TARGET_MODULES

    def add(self, name: str, config: PeftConfig) -> nn.Module | None:
        if getattr(config, "target_modules", None) is None:
            config.target_modules = self.default_target_modules()  # type: ignore[attr-defined]
        found = self.target_names(config)
        if config.target_modules == targets.ALL_LINEAR:  # type: ignore[attr-defined]
            # HF PEFT saves the qualified names it picked, so the file names exactly these layers.
            config.target_modules = sorted(found)  # type: ignore[attr-defined]
        for module_name in found:
            module = self.model.get_submodule(module_name)
            if not isinstance(module, self.layer_class):
                module = self.new_layer(module_name, module, config)
                replace_module(self.model, module_name, module)
            self.add_to_layer(module, module_name, name, config)
            module.train(self.model.training)  # new modules start in training mode: an eval model stays in eval
        return None

    def new_layer(self, module_name: str, module: nn.Module, config: PeftConfig) -> AdapterLayer:
        """`module` wrapped in this method's layer (no adapter yet); by default a `WeightLayer` subclass's
        `layer_class(module, fan_in_fan_out)`, which is set for GPT-2's `Conv1D`."""
        return self.layer_class(module, conv1d_fan_in_fan_out(module_name, module, config))  # type: ignore[call-arg]

    def add_to_layer(self, layer: Any, module_name: str, name: str, config: PeftConfig) -> None:
        """Give `layer` (this method's layer, at `module_name`) adapter `name`."""
        layer.add(name, config, module_name)

    def default_target_modules(self) -> list[str]:
        """The method's usual targets for this architecture, or an error telling the user to choose."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type in self.default_targets:
            return list(self.default_targets[model_type])
        raise ValueError(
            f"target_modules is not set and petune has no {type(self).__name__} default for model type "
            f"{model_type!r}; pass target_modules=[...] from the model's {self.supported_type_names} layers: "
            f"{', '.join(self.supported_layer_names())}"
        )

    def target_names(self, config: PeftConfig) -> list[str]:
        """Qualified names of the modules `config` adapts, or an error listing the candidates."""
        target_modules = getattr(config, "target_modules", None)
        assert target_modules is not None
        skip = targets.output_layer_names(self.model) if target_modules == targets.ALL_LINEAR else set()
        wrapped = [n for n, m in adapter_layers(self.model)]
        found = []
        for module_name, module in self.model.named_modules():
            inside_wrapper = any(module_name.startswith(f"{w}.") for w in wrapped)
            if module_name and not inside_wrapper and self._is_target(module_name, module, config, skip):
                found.append(module_name)
        if not found:
            raise ValueError(
                f"target_modules={target_modules!r} matched no layer of {type(self.model).__name__}; "
                f"its {self.supported_type_names} layers are: {', '.join(self.supported_layer_names())}"
            )
        return found

    def _is_target(self, module_name: str, module: nn.Module, config: PeftConfig, skip: set[str]) -> bool:
        exclude = getattr(config, "exclude_modules", None)
        if exclude and targets.matches(exclude, module_name):
            return False
        if config.modules_to_save and targets.is_in_module_to_save(config.modules_to_save, module_name):
            return False
        if isinstance(module, ModulesToSave) or module_name in skip:
            return False
        target_modules = getattr(config, "target_modules", None)
        assert target_modules is not None
        if target_modules == targets.ALL_LINEAR:
            hit = targets.is_linear(module) or isinstance(module, self.layer_class)
        else:
            hit = targets.matches(target_modules, module_name)
        layers_to_transform = getattr(config, "layers_to_transform", None)
        if hit and layers_to_transform is not None:
            hit = targets.layer_index(module_name, getattr(config, "layers_pattern", None)) in layers_to_transform
        if hit and not self.supports(module):
            raise ValueError(
                f"target module {module_name!r} is a {type(module).__name__}; {type(self).__name__} adapts "
                f"{self.supported_type_names} layers: narrow target_modules to "
                f"{', '.join(self.supported_layer_names()) or '(none in this model)'}"
            )
        return hit

    def supports(self, module: nn.Module) -> bool:
        """Whether this method can adapt `module` (or has already wrapped it)."""
        return isinstance(module, (*self.supported_types, self.layer_class))

    def supported_layer_names(self) -> list[str]:
        """The distinct short names of the model's modules this method can adapt, to suggest as targets."""
        return sorted(
            {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if n and isinstance(m, self.supported_types)}
        )

    def merge(self, names: list[str], safe_merge: bool) -> None:
        for _, layer in adapter_layers(self.model):
            if isinstance(layer, self.layer_class):
                for name in names:
                    if name in layer.adapters:
                        layer.merge(name, safe_merge)  # type: ignore[operator]

    def unmerge(self) -> None:
        for _, layer in adapter_layers(self.model):
            if isinstance(layer, self.layer_class):
                layer.unmerge()  # type: ignore[operator]

    @property
    def supports_mixed_batch(self) -> bool:
        return True


class LinearTuner(LayerTuner):
    """A `LayerTuner` for methods HF PEFT applies to `nn.Linear` only (HRA, OFT, BOFT), refusing GPT-2's `Conv1D`."""

    supported_types = (nn.Linear,)
    supported_type_names = "nn.Linear"

    def new_layer(self, module_name: str, module: nn.Module, config: PeftConfig) -> AdapterLayer:
        if hasattr(config, "fan_in_fan_out"):
            conv1d_fan_in_fan_out(module_name, module, config)  # False for nn.Linear: corrects the config if set
        return self.layer_class(module, False)  # type: ignore[call-arg]


def conv1d_fan_in_fan_out(module_name: str, module: nn.Module, config: Any) -> bool:
    """Whether `module` stores its weight as (in, out): GPT-2's `Conv1D`; `config.fan_in_fan_out` is corrected
    (with a warning, as HF PEFT does) when it says otherwise."""
    stored_transposed = isinstance(module, Conv1D)
    if stored_transposed != config.fan_in_fan_out:
        layout = "a Conv1D (weight stored as in x out)" if stored_transposed else "not a Conv1D (weight is out x in)"
        warnings.warn(f"{module_name} is {layout}; setting fan_in_fan_out={stored_transposed}", stacklevel=5)
        config.fan_in_fan_out = stored_transposed
    return stored_transposed


def per_module(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value `rank_pattern` / `alpha_pattern` give module `module_name`, else `default`."""
    key = targets.pattern_key(list(pattern), module_name)
    return pattern[key] if key else default

"""Attaching FourierFT to a model: per-module n_frequency, HF PEFT's default targets."""

from __future__ import annotations

import re

from petune import targets
from petune.config import PeftConfig
from petune.methods.fourierft.config import FourierFTConfig
from petune.methods.fourierft.layer import FourierFTAdapter, FourierFTLayer
from petune.methods.tuner import LayerTuner

# HF PEFT's table: LoRA's, but GPT-2's MLP output projection.
FOURIERFT_TARGET_MODULES = {**targets.DEFAULT_TARGET_MODULES, "gpt2": ["mlp.c_proj"]}


class FourierFT(LayerTuner):
    """FourierFT on `nn.Linear` and `Conv1D` layers."""

    config_class = FourierFTConfig
    layer_class = FourierFTLayer
    default_targets = FOURIERFT_TARGET_MODULES

    def add_to_layer(self, layer: FourierFTLayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, FourierFTConfig)
        n = n_frequency(config, module_name)
        if n > layer.in_features * layer.out_features:
            raise ValueError(
                f"FourierFTConfig.n_frequency={n} is more than {module_name!r} has weights "
                f"({layer.out_features} x {layer.in_features}); lower it or set n_frequency_pattern for it"
            )
        assert config.random_loc_seed is not None
        adapter = FourierFTAdapter(
            layer.in_features, layer.out_features, n, config.scaling, config.random_loc_seed, config.init_weights
        )
        layer.adapters[name] = adapter.to(layer.base_weight().device)


def n_frequency(config: FourierFTConfig, module_name: str) -> int:
    """HF PEFT's rule: the first `n_frequency_pattern` key that matches after a `.` at the name's end."""
    for key, value in config.n_frequency_pattern.items():
        if re.match(rf".*\.{key}$", module_name):
            return value
    return config.n_frequency

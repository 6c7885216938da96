"""Attaching HRA to a model (LoRA's default targets, `nn.Linear` layers)."""

from __future__ import annotations

from petune.config import PeftConfig
from petune.methods.hra.config import HRAConfig
from petune.methods.hra.layer import HRALayer
from petune.methods.tuner import LinearTuner


class HRA(LinearTuner):
    """HRA on `nn.Linear` layers (HF PEFT's HRA does not take GPT-2's `Conv1D` either)."""

    config_class = HRAConfig
    layer_class = HRALayer

    def add_to_layer(self, layer: HRALayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, HRAConfig)
        layer.add(name, config.r, config.apply_GS, config.init_weights)

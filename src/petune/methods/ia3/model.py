"""Attaching (IA)^3 to a model: its default targets, which of them are feed-forward layers, merging."""

from __future__ import annotations

import re

from petune.config import PeftConfig
from petune.methods.ia3.config import IA3Config
from petune.methods.ia3.layer import IA3Layer
from petune.methods.tuner import LayerTuner

# HF PEFT's defaults: the keys, values and feed-forward output projection (the paper's three places).
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "t5": ["k", "v", "wo"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "phi": ["fc2"],
    "t5": ["wo"],
}


class IA3(LayerTuner):
    """(IA)^3 on `nn.Linear` and `Conv1D` layers."""

    config_class = IA3Config
    layer_class = IA3Layer
    default_targets = IA3_TARGET_MODULES

    def add(self, name: str, config: PeftConfig) -> None:
        assert isinstance(config, IA3Config)
        if config.feedforward_modules is None:
            config.feedforward_modules = self._default_feedforward()
        super().add(name, config)

    def _default_feedforward(self) -> list[str]:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type in IA3_FEEDFORWARD_MODULES:
            return list(IA3_FEEDFORWARD_MODULES[model_type])
        raise ValueError(
            f"IA3Config.feedforward_modules is not set and petune has no default for model type {model_type!r}: "
            f"pass feedforward_modules=[...] (targets whose input is rescaled; [] for none)"
        )

    def add_to_layer(self, layer: IA3Layer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, IA3Config)
        layer.add(name, is_feedforward(config, module_name), config.init_ia3_weights)


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """HF PEFT's rule: a regex must match the whole name; a list entry must end it (no `.` boundary)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(suffix) for suffix in ff or [])

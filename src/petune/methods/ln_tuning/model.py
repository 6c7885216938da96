"""Attaching LN tuning to a model: its default targets (the normalisation layers) and merging."""

from __future__ import annotations

from torch import nn

from petune.config import PeftConfig
from petune.methods.ln_tuning.config import LNTuningConfig
from petune.methods.ln_tuning.layer import LNTuningLayer
from petune.methods.tuner import LayerTuner

# HF PEFT's defaults: each architecture's normalisation layers.
LN_TUNING_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "t5": ["layer_norm", "final_layer_norm"],
}


class LNTuning(LayerTuner):
    """LN tuning: any module type can be tuned (a trainable copy of it); normalisation layers by default."""

    config_class = LNTuningConfig
    layer_class = LNTuningLayer
    supported_types = (nn.Module,)
    supported_type_names = "normalisation"
    default_targets = LN_TUNING_TARGET_MODULES

    def new_layer(self, module_name: str, module: nn.Module, config: PeftConfig) -> LNTuningLayer:
        return LNTuningLayer(module)

    def add_to_layer(self, layer: LNTuningLayer, module_name: str, name: str, config: PeftConfig) -> None:
        layer.add(name)

    def supported_layer_names(self) -> list[str]:
        """The model's normalisation layers (any module can be a target; these are the usual ones)."""
        return sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if "Norm" in type(m).__name__})

    def merge(self, names: list[str], safe_merge: bool) -> None:
        if len(names) > 1:
            raise ValueError(f"LN tuning merges one adapter at a time; got {names}")
        super().merge(names, safe_merge)

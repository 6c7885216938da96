"""Attaching VeRA: one shared random projection per adapter, sized for the largest target layer."""

from __future__ import annotations

import torch
from torch import nn

from petune.config import PeftConfig
from petune.methods.tuner import LayerTuner
from petune.methods.vera.config import VeraConfig
from petune.methods.vera.layer import VeraAdapter, VeraLayer, VeraProjection
from petune.methods.weight_layer import WeightLayer

# HF PEFT writes the shared matrices at the top of the file, outside any layer.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


class Vera(LayerTuner):
    """VeRA on `nn.Linear` and `Conv1D` layers."""

    config_class = VeraConfig
    layer_class = VeraLayer

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.projections: dict[str, VeraProjection] = {}
        self.configs: dict[str, VeraConfig] = {}

    def add(self, name: str, config: PeftConfig) -> VeraProjection:
        assert isinstance(config, VeraConfig)
        self._check_like_existing(config)
        if config.target_modules is None:
            config.target_modules = self.default_target_modules()
        dims = [linear_dims(self.model.get_submodule(n)) for n in self.target_names(config)]
        max_out, max_in = (max(d[i] for d in dims) for i in (0, 1))
        self.projections[name] = VeraProjection(config.r, max_out, max_in, config.projection_prng_key)
        super().add(name, config)
        return self.projections[name]

    def _check_like_existing(self, config: VeraConfig) -> None:
        """HF PEFT's rule: adapters of one model share the seed and the choice to save the projection."""
        for other in self.configs.values():
            if (other.projection_prng_key, other.save_projection) != (
                config.projection_prng_key,
                config.save_projection,
            ):
                raise ValueError(
                    "every VeRA adapter of a model needs the same projection_prng_key and save_projection; "
                    f"got {config.projection_prng_key}, {config.save_projection} after "
                    f"{other.projection_prng_key}, {other.save_projection}"
                )

    def add_to_layer(self, layer: VeraLayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, VeraConfig)
        projection = self.projections[name]
        adapter = VeraAdapter(layer.in_features, layer.out_features, projection, config)
        layer.adapters[name] = adapter.to(layer.base_weight().device)
        self.configs[name] = config

    def state_dict(self, name: str, config: PeftConfig, module: nn.Module | None) -> dict[str, torch.Tensor]:
        assert isinstance(config, VeraConfig) and module is not None
        if not config.save_projection:
            return {}
        return {key: getattr(module, buffer) for buffer, key in PROJECTION_KEYS.items()}

    def load_state_dict(
        self, name: str, config: PeftConfig, module: nn.Module | None, state_dict: dict[str, torch.Tensor]
    ) -> set[str]:
        assert module is not None
        consumed = set()
        with torch.no_grad():
            for buffer, key in PROJECTION_KEYS.items():
                if key in state_dict:
                    target: torch.Tensor = getattr(module, buffer)
                    if state_dict[key].shape != target.shape:
                        raise ValueError(
                            f"tensor {key} has shape {tuple(state_dict[key].shape)} in the adapter file but "
                            f"{tuple(target.shape)} in the model: the adapter was made for a different base model"
                        )
                    target.copy_(state_dict[key])
                    consumed.add(key)
        return consumed


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, GPT-2's `Conv1D` (weight stored (in, out)) or a wrapped one."""
    if isinstance(module, WeightLayer):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return weight.shape[1], weight.shape[0]

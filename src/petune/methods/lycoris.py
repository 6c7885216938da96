"""What LoHa and LoKr (the LyCORIS family, Yeh et al. 2023) share: config fields, dropouts, the layer.

Both build a full-size update delta_W (out, in) from small factors, scale it by alpha / r and add it to
the frozen weight (`DeltaLayer`); they differ only in how the factors combine (Hadamard vs Kronecker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from petune.config import PeftConfig
from petune.methods.tuner import LayerTuner, per_module
from petune.methods.validate import (
    check_bool,
    check_layers,
    check_module_names,
    check_number,
    check_patterns,
    check_positive_int,
    check_probability,
)
from petune.methods.weight_layer import DeltaLayer, linear_update


@dataclass
class LycorisConfig(PeftConfig):
    """HF PEFT's fields common to `LoHaConfig` and `LoKrConfig`.

    Args:
        r: the rank of each factor pair.
        alpha: delta_W is scaled by `alpha / r`.
        rank_dropout: in training, each output row of delta_W is dropped with this probability.
        module_dropout: in training, the whole update is skipped with this probability.
        use_effective_conv2d: HF PEFT's option for convolutions (petune adapts linear layers only).
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig`.
        init_weights: True: delta_W starts at zero (the model starts unchanged); False: random (tests).
        rank_pattern, alpha_pattern: per-module r and alpha, `{name pattern: value}`.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "alpha")
        check_probability(self, "rank_dropout", "module_dropout")
        check_bool(self, "use_effective_conv2d")
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        check_patterns(self)


class LycorisAdapter(nn.Module):
    """One adapter: subclasses define `product()`, the unscaled delta_W (out, in), from float32 factors."""

    def __init__(self, r: int, alpha: float, config: LycorisConfig) -> None:
        super().__init__()
        self.scaling = alpha / r
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.rescale_rank_dropout = True

    def product(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """scaling * product(), shape (out, in); in training, rank dropout zeroes random output rows."""
        weight = self.product() * self.scaling
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean()
            weight = weight * keep.unsqueeze(1)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x delta_W^T, (..., out); in training, skipped entirely with probability `module_dropout`."""
        if self.training and self.module_dropout > 0 and torch.rand(1).item() < self.module_dropout:
            return x.new_zeros(())
        return linear_update(x, self.delta_weight())


def kaiming_(*params: nn.Parameter) -> None:
    """`nn.Linear`'s default init (Kaiming-uniform with a = sqrt(5)), the LyCORIS factors' random init."""
    for param in params:
        nn.init.kaiming_uniform_(param, a=5**0.5)


class LycorisTuner(LayerTuner):
    """Wraps `nn.Linear` layers in `DeltaLayer`s; subclasses set `adapter_class(in, out, r, alpha, config)`."""

    layer_class = DeltaLayer
    supported_types = (nn.Linear,)
    supported_type_names = "nn.Linear"
    adapter_class: Any = LycorisAdapter

    def new_layer(self, module_name: str, module: nn.Module, config: PeftConfig) -> DeltaLayer:
        return self.layer_class(module, fan_in_fan_out=False)

    def add_to_layer(self, layer: DeltaLayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, LycorisConfig)
        r = per_module(config.rank_pattern, module_name, config.r)
        alpha = per_module(config.alpha_pattern, module_name, config.alpha)
        adapter = self.adapter_class(layer.in_features, layer.out_features, r, alpha, config)
        layer.adapters[name] = adapter.to(layer.base_weight().device)

"""Attaching LoHa to a model (LoRA's default targets, `nn.Linear` layers)."""

from __future__ import annotations

from petune.methods.loha.config import LoHaConfig
from petune.methods.loha.layer import LoHaAdapter, LoHaLayer
from petune.methods.lycoris import LycorisTuner


class LoHa(LycorisTuner):
    """LoHa on `nn.Linear` layers."""

    config_class = LoHaConfig
    layer_class = LoHaLayer
    adapter_class = LoHaAdapter

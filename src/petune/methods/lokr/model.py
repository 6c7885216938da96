"""Attaching LoKr to a model (LoRA's default targets, `nn.Linear` layers)."""

from __future__ import annotations

from petune.methods.lokr.config import LoKrConfig
from petune.methods.lokr.layer import LoKrAdapter, LoKrLayer
from petune.methods.lycoris import LycorisTuner


class LoKr(LycorisTuner):
    """LoKr on `nn.Linear` layers."""

    config_class = LoKrConfig
    layer_class = LoKrLayer
    adapter_class = LoKrAdapter

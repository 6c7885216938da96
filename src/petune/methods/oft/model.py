"""Attaching OFT to a model (LoRA's default targets, `nn.Linear` layers)."""

from __future__ import annotations

from petune.methods.oft.config import OFTConfig
from petune.methods.oft.layer import OFTLayer
from petune.methods.tuner import LinearTuner


class OFT(LinearTuner):
    """OFT on `nn.Linear` layers (HF PEFT's OFT does not take GPT-2's `Conv1D` either)."""

    config_class = OFTConfig
    layer_class = OFTLayer

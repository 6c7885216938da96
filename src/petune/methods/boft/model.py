"""Attaching BOFT to a model (LoRA's default targets, `nn.Linear` layers)."""

from __future__ import annotations

from petune.methods.boft.config import BOFTConfig
from petune.methods.boft.layer import BOFTLayer
from petune.methods.tuner import LinearTuner


class BOFT(LinearTuner):
    """BOFT on `nn.Linear` layers (HF PEFT's BOFT does not take GPT-2's `Conv1D` either)."""

    config_class = BOFTConfig
    layer_class = BOFTLayer

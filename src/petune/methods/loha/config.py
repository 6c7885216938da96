"""`LoHaConfig`: HF PEFT's fields and defaults for LoHa."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftType
from petune.methods.lycoris import LycorisConfig
from petune.methods.validate import check_bool


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa, "FedPara" (Hyeon-Woo et al. 2022, section 3.1): delta_W = (alpha / r) (W1a W1b) * (W2a W2b),
    the element-wise product of two rank-r matrices, whose rank can reach r^2 for 2 r (out + in) parameters.

    Fields: see `LycorisConfig`. `init_weights=True` zeroes W2b (the others Kaiming-uniform), so
    delta_W starts at zero.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOHA
        check_bool(self, "init_weights")

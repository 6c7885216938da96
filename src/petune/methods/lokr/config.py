"""`LoKrConfig`: HF PEFT's fields and defaults for LoKr."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftType
from petune.methods.lycoris import LycorisConfig
from petune.methods.validate import check_bool


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
    Evaluation", section 3.2): delta_W = (alpha / r) W1 kron W2, with out = a c and in = b d split near
    their square roots, W1 (a, b) and W2 (c, d); W2 (and with `decompose_both` W1) is itself a rank-r
    product when that is smaller than the full factor.

    Fields: see `LycorisConfig`, plus:
        decompose_both: also write W1 as a rank-r product (when r < max(a, b) / 2).
        decompose_factor: split each dimension with one factor near this (-1: near the square root).
        rank_dropout_scale: rescale the rows kept by rank dropout by 1 / (share kept).
        init_weights: True: W1 = 0, W2 random; "lycoris": W2 = 0, W1 random (LyCORIS's way); False: random.
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        check_bool(self, "decompose_both", "rank_dropout_scale")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ValueError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, got {factor!r}")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")

"""`OFTConfig`: HF PEFT's fields and defaults for OFT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petune.config import PeftConfig, PeftType
from petune.methods.validate import (
    check_bool,
    check_exactly_one,
    check_layers,
    check_layers_pattern,
    check_module_names,
    check_no_bias,
    check_non_negative_int,
    check_positive_int,
    check_probability,
)


@dataclass
class OFTConfig(PeftConfig):
    """OFT, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (Qiu et al. 2023, section 3):
    W' = W R^T, so y = (x R) W^T + b, for a block-diagonal orthogonal R (in, in) whose blocks are Cayley
    transforms of trained skew-symmetric matrices. Rotating the input space keeps the angles between a layer's
    neurons ("hyperspherical energy"); R = I at the start, so the model starts unchanged.

    Args:
        r: the number of blocks per layer; or 0, then `in_features / oft_block_size`. Set exactly one of `r`
            and `oft_block_size`; a value that does not divide the layer's input size is moved to the nearest
            one that does (with a warning, as HF PEFT does).
        oft_block_size: the size b of each block (b (b - 1) / 2 trained numbers per block); 0 when `r` is set.
        module_dropout: in training, this share of a layer's blocks act as I (multiplicative dropout, section 4);
            HF PEFT 0.21 keeps the field but does not apply it to linear layers.
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig` (nn.Linear only).
        fan_in_fan_out: kept for HF PEFT's files; OFT adapts nn.Linear, whose weight is (out, in).
        bias: only "none" (training biases with OFT is not supported by petune).
        init_weights: True: every skew matrix 0 (R = I); False: N(0, 0.1^2) entries (for tests).
        coft: constrained OFT (section 3.3): before each use, a block whose skew matrix has norm above
            eps / sqrt(blocks) is scaled back to that norm, bounding how far R moves from I.
        eps: COFT's radius.
        block_share: all blocks of a layer share one trained matrix (b (b - 1) / 2 numbers per layer).
        use_cayley_neumann: approximate the Cayley transform's inverse by a Neumann series (faster, nearly
            orthogonal); False: the exact (I - Q)(I + Q)^-1.
        num_cayley_neumann_terms: terms of that series.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.OFT
        check_non_negative_int(self, "r", "oft_block_size")
        check_exactly_one(self, "r", "oft_block_size")
        check_probability(self, "module_dropout")
        check_bool(self, "fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann")
        check_positive_int(self, "num_cayley_neumann_terms")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or self.eps <= 0:
            raise ValueError(f"OFTConfig.eps must be a positive number, got {self.eps!r}")
        check_no_bias(self)
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        check_layers_pattern(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with the HF PEFT version whose Cayley-Neumann series petune computes (HF PEFT warns
        that a file without one may come from before 0.18, when the series was different)."""
        return {**super().to_dict(), "peft_version": CAYLEY_NEUMANN_PEFT_VERSION}


CAYLEY_NEUMANN_PEFT_VERSION = "0.21.2"

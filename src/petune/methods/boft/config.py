"""`BOFTConfig`: HF PEFT's fields and defaults for BOFT."""

from __future__ import annotations

from dataclasses import dataclass

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
class BOFTConfig(PeftConfig):
    """BOFT, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (Liu et al. 2024, section 4):
    y = s * ((x M) W^T) + b with M = M_m ... M_1, each M_i = P_i diag(R_i1, ..., R_iD) P_i^T a block-diagonal
    orthogonal matrix (Cayley transforms of trained b x b matrices) between butterfly permutations P_i, and s a
    trained scale per output. m butterfly factors let a small block mix the whole input (section 4.2); m = 1 is
    OFT with a scale.

    Args:
        boft_block_size: the block size b; 0 when `boft_block_num` is set (set exactly one).
        boft_block_num: blocks per factor, D = in_features / b; 0 when `boft_block_size` is set.
        boft_n_butterfly_factor: m, the number of butterfly factors (factor i pairs blocks 2^(i-1) apart).
            Note: HF PEFT 0.21 uses m = 1 whatever this says unless its CUDA extension compiles; petune always
            uses m.
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig` (nn.Linear only).
        boft_dropout: in training, this share of one factor's blocks act as I (multiplicative dropout).
        fan_in_fan_out: kept for HF PEFT's files; BOFT adapts nn.Linear, whose weight is (out, in).
        bias: only "none" (training biases with BOFT is not supported by petune).
        init_weights: True: R = 0 (M = I) and s = 1; False: R ~ N(0, 0.1^2), s ~ N(1, 0.1^2) (for tests).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOFT
        check_non_negative_int(self, "boft_block_size", "boft_block_num")
        check_exactly_one(self, "boft_block_size", "boft_block_num")
        check_positive_int(self, "boft_n_butterfly_factor")
        check_probability(self, "boft_dropout")
        check_bool(self, "fan_in_fan_out", "init_weights")
        check_no_bias(self)
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        check_layers_pattern(self)

"""`AdaLoraConfig`: HF PEFT's fields and defaults for AdaLoRA."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from petune.config import PeftConfig, PeftType
from petune.methods.validate import (
    check_bool,
    check_layers,
    check_layers_pattern,
    check_module_names,
    check_no_bias,
    check_non_negative_int,
    check_number,
    check_positive_int,
    check_probability,
)


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al. 2023).

    Each adapted layer adds P diag(lambda) Q x * lora_alpha / init_r (section 3.1): lora_B = P (out, r),
    lora_E = lambda (r, 1), lora_A = Q (r, in), an SVD-shaped update whose singular values can be switched off.
    A regulariser ||P^T P - I|| + ||Q Q^T - I|| keeps P and Q near orthogonal. During training the total rank
    shrinks from init_r per layer to target_r per layer on average (section 3.3): `update_and_allocate(step)`
    scores each (P column, lambda, Q row) triplet by smoothed sensitivity |w dL/dw| times its uncertainty and
    zeroes the lowest-scoring lambdas, so the rank goes where it matters.

    Schedule, in optimizer steps: `tinit` steps at the full budget, then a cubic decrease to the target until
    `total_step - tfinal`, where the ranks are fixed (`rank_pattern`) for the last `tfinal` steps.

    Args:
        target_r: the average rank per layer at the end.
        init_r: every layer's rank at the start.
        tinit, tfinal: steps before the budget starts to shrink, and steps after it stops.
        deltaT: reallocate every deltaT steps while the budget shrinks.
        beta1: smoothing of the sensitivity (an exponential moving average).
        beta2: smoothing of its uncertainty |sensitivity - average|.
        orth_reg_weight: the regulariser's weight in the loss.
        total_step: the number of training steps (required: the schedule needs it).
        rank_pattern: set by the allocation: {"<module>.lora_E": [kept?] * init_r}; a saved adapter holds only
            the kept ranks, and loading builds each layer at its kept rank.
        r: not used (HF PEFT's LoRA field; set `init_r`).
        lora_alpha, lora_dropout, target_modules, exclude_modules, fan_in_fan_out, layers_to_transform,
            layers_pattern: as in `LoraConfig`; the update is scaled by lora_alpha / init_r.
        bias: only "none" (training biases with AdaLoRA is not supported by petune).
        init_lora_weights: True: lambda = 0 (the model starts unchanged), P and Q ~ N(0, 0.02^2); False: all
            N(0, 1) (for tests).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADALORA
        check_positive_int(self, "init_r", "target_r", "deltaT")
        check_non_negative_int(self, "tinit", "tfinal")
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        self._check_schedule()
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {value!r}")
        check_number(self, "lora_alpha")
        check_probability(self, "lora_dropout")
        check_bool(self, "fan_in_fan_out", "init_lora_weights")
        check_no_bias(self)
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        check_layers_pattern(self)
        self._check_rank_pattern()
        if self.r != 8:
            warnings.warn("AdaLoraConfig.r is not used by AdaLoRA; set init_r (the starting rank)", stacklevel=3)

    def _check_schedule(self) -> None:
        total = self.total_step
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"AdaLoraConfig.total_step must be a positive integer (the training steps), got {total!r}")
        if self.tinit >= total - self.tfinal:
            raise ValueError(
                f"AdaLoraConfig: tinit ({self.tinit}) must be below total_step - tfinal ({total} - {self.tfinal}), "
                f"leaving steps in which the budget shrinks"
            )
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, int | float):
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        for key, kept in self.rank_pattern.items():
            if not isinstance(kept, list) or not all(isinstance(k, bool | int) for k in kept):
                raise ValueError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of booleans, got {kept!r}")

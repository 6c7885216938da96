"""`HRAConfig`: HF PEFT's fields and defaults for HRA."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftConfig, PeftType
from petune.methods.validate import check_bool, check_layers, check_module_names, check_positive_int


@dataclass
class HRAConfig(PeftConfig):
    """HRA, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
    Adaptation" (Yuan et al. 2024, section 3): W' = W H_1 ... H_r, H_i = I - 2 u_i u_i^T / ||u_i||^2, an
    orthogonal change of the input space learned as r vectors u_i (in,).

    Args:
        r: the number of reflections (even, for the identity start).
        apply_GS: orthonormalise the u_i first (Gram-Schmidt), making the chain I - 2 U U^T (section 3.3).
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig`.
        init_weights: True: the u_i come in equal pairs, whose reflections cancel (the model starts unchanged);
            False: random (for tests).
        bias: only "none" (training biases with HRA is not supported by petune).
    """

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HRA
        check_positive_int(self, "r")
        check_bool(self, "apply_GS", "init_weights")
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        if self.bias != "none":
            raise ValueError(f"HRAConfig.bias must be 'none' in petune (it does not train biases), got {self.bias!r}")

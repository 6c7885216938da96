"""`VeraConfig`: HF PEFT's fields and defaults for VeRA."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftConfig, PeftType
from petune.methods.validate import (
    check_bool,
    check_layers,
    check_module_names,
    check_number,
    check_positive_int,
    check_probability,
)


@dataclass
class VeraConfig(PeftConfig):
    """VeRA, "Vector-based Random Matrix Adaptation" (Kopiczko et al. 2024, section 3.1):
    h = W x + Lambda_b B Lambda_d A x. A (r, in) and B (out, r) are random, frozen and shared by every
    layer (sliced to each layer's size); only the diagonal scalings d (r,) and b (out,) train.

    Args:
        r: the rank of the shared random matrices (the paper uses up to 1024: it costs no trained parameters
            beyond d).
        target_modules, layers_to_transform, layers_pattern: as in `LoraConfig`.
        projection_prng_key: the seed A and B are drawn from (Kaiming-uniform, A first, then B).
        save_projection: save A and B in the adapter file (True), or regenerate them from the seed.
        vera_dropout: dropout on the input of the VeRA path.
        d_initial: the initial value of every d (section 3.2: b starts at zero, so the model starts unchanged).
        fan_in_fan_out: the layer stores its weight as (in, out), like GPT-2's `Conv1D` (set for you).
        bias: only "none" (training biases with VeRA is not supported by petune).
        init_weights: True: b = 0 and d = d_initial; False: b = 1, d ~ N(0, 1) (for tests).
    """

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.VERA
        check_positive_int(self, "r")
        self.target_modules = check_module_names(self, "target_modules")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"VeraConfig.projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        check_bool(self, "save_projection", "fan_in_fan_out", "init_weights")
        check_probability(self, "vera_dropout")
        check_number(self, "d_initial")
        if self.bias != "none":
            raise ValueError(f"VeraConfig.bias must be 'none' in petune (it does not train biases), got {self.bias!r}")
        check_layers(self)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("VeraConfig.layers_pattern needs layers_to_transform (the block indices to adapt)")

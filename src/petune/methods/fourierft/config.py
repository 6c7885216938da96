"""`FourierFTConfig`: HF PEFT's fields and defaults for FourierFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from petune.config import PeftConfig, PeftType
from petune.methods.validate import check_bool, check_layers, check_module_names, check_number, check_positive_int


@dataclass
class FourierFTConfig(PeftConfig):
    """FourierFT, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (Gao et al. 2024,
    section 3): delta_W = scaling * Re(IDFT2(F)), where the (out, in) spectrum F is zero except at
    `n_frequency` entries drawn once at random (shared by every layer of the same shape), whose values train.

    Args:
        n_frequency: trained spectral coefficients per layer (at most out x in).
        scaling: the update's scale (the paper's alpha; larger for smaller n_frequency).
        random_loc_seed: the seed that picks the entries (`torch.randperm`, as HF PEFT does).
        fan_in_fan_out: the layer stores its weight as (in, out), like GPT-2's `Conv1D` (set for you).
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig`.
        bias: only "none" (training biases with FourierFT is not supported by petune).
        n_frequency_pattern: per-module n_frequency, `{name pattern: n}`.
        init_weights: False (HF PEFT's and the paper's default): coefficients ~ N(0, 1); True: zero, so the
            model starts unchanged.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FOURIERFT
        check_positive_int(self, "n_frequency")
        check_number(self, "scaling")
        seed = self.random_loc_seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"FourierFTConfig.random_loc_seed must be an integer, got {seed!r}")
        check_bool(self, "fan_in_fan_out", "init_weights")
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))
        check_layers(self)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("FourierFTConfig.layers_pattern needs layers_to_transform (the block indices to adapt)")
        if self.bias != "none":
            raise ValueError(f"FourierFTConfig.bias must be 'none' in petune (no bias training), got {self.bias!r}")
        for key, n in self.n_frequency_pattern.items():
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"FourierFTConfig.n_frequency_pattern[{key!r}] must be a positive integer, got {n!r}")

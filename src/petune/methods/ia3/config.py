"""`IA3Config`: HF PEFT's fields and defaults for (IA)^3."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftConfig, PeftType
from petune.methods.validate import check_bool, check_module_names


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3, "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al. 2022, section 3.3).

    Each adapted layer learns one vector l: an attention-style layer's output becomes l * (W x + b), a
    feed-forward layer's input becomes l * x (the paper rescales keys, values and the feed-forward
    activation). l starts at 1, so the model starts unchanged; it merges into W exactly.

    Args:
        target_modules: modules to adapt, matched like `LoraConfig.target_modules` (`"all-linear"` too).
            None picks the architecture's (IA)^3 targets (e.g. Llama's k_proj, v_proj, down_proj).
        exclude_modules: modules never adapted, matched like `target_modules`.
        feedforward_modules: the targets whose input (not output) is rescaled: a regex (full match) or a
            list of name suffixes; a list must be a subset of a list `target_modules`. None picks the
            architecture's feed-forward output projection.
        fan_in_fan_out: the layer stores its weight as (in, out), like GPT-2's `Conv1D` (set for you).
        init_ia3_weights: True: l = 1 (the model starts unchanged); False: l ~ N(0, 1) (for tests).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            setattr(self, name, check_module_names(self, name))
        check_bool(self, "fan_in_fan_out", "init_ia3_weights")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(
                f"IA3Config.feedforward_modules must be a subset of target_modules; "
                f"{sorted(set(ff) - set(targets))} are not targets"
            )

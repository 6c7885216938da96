"""`LNTuningConfig`: HF PEFT's fields for LN tuning."""

from __future__ import annotations

from dataclasses import dataclass

from petune.config import PeftConfig, PeftType
from petune.methods.validate import check_module_names


@dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention"): each target module gets a trainable
    copy per adapter; everything else stays frozen. Meant for the normalisation layers (their gain and
    bias: 2 x hidden parameters per LayerNorm, hidden per RMSNorm), but any module type can be tuned.

    Args:
        target_modules: modules to tune, matched like `LoraConfig.target_modules`. None picks the
            architecture's normalisation layers (HF PEFT's table, e.g. Llama's input_layernorm,
            post_attention_layernorm and the final norm).
        exclude_modules: modules never tuned, matched like `target_modules`.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LN_TUNING
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, check_module_names(self, name))

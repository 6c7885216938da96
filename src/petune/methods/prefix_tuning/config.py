"""`PrefixTuningConfig`: HF PEFT's fields and defaults for prefix tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from petune.config import PeftType
from petune.methods.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): V trained keys and values in front of every layer's attention.

    The sizes come from the model: `num_layers`, and under grouped-query attention the key/value heads
    (`num_attention_heads` holds them, `token_dim` is kv_heads * head_dim, as HF PEFT writes them).

    Args:
        prefix_projection: produce the prefix with a two-layer MLP (Linear-Tanh-Linear) from a (V, token_dim)
            table, the reparameterisation of section 4.3 that stabilises training.
        encoder_hidden_size: the MLP's hidden width; `token_dim` when None.
        init_weights: None: random; `"zero"`: the prefix (or the MLP's last layer) starts at zero.
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: Literal["zero"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")

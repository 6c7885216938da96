"""`PromptEncoderConfig`: HF PEFT's fields and defaults for P-tuning."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from petune.config import PeftType
from petune.methods.prompt_learning import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network between the trained table and the virtual tokens (HF PEFT's values)."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a small network.

    Args:
        encoder_reparameterization_type: `MLP` (Linear-ReLU-Linear-ReLU-Linear) or `LSTM` (a bidirectional
            LSTM, then Linear-ReLU-Linear), the prompt encoder of section 3.2.
        encoder_hidden_size: the encoder's hidden width; the model's hidden size when None.
        encoder_num_layers: LSTM layers (the MLP always has three linear layers, as in HF PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type
            )
        except ValueError:
            raise ValueError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is unknown; use MLP or LSTM"
            ) from None
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise ValueError(f"encoder_num_layers must be positive, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

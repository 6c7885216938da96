"""P-tuning (Liu et al. 2021): virtual tokens produced by a trained MLP or LSTM prompt encoder."""

from petune.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from petune.methods.p_tuning.model import PromptEncoder, PTuning

__all__ = ["PTuning", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]

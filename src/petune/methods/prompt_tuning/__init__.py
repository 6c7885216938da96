"""Prompt tuning (Lester et al. 2021): trained virtual token embeddings in front of the input."""

from petune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from petune.methods.prompt_tuning.model import PromptEmbedding, PromptTuning

__all__ = ["PromptEmbedding", "PromptTuning", "PromptTuningConfig", "PromptTuningInit"]

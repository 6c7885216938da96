"""What the prompt methods share: the config's size fields, the virtual-token encoder, the input handling."""

from petune.methods.prompt_learning.config import ModelSizes, PromptLearningConfig, model_sizes
from petune.methods.prompt_learning.encoder import VirtualTokenEncoder
from petune.methods.prompt_learning.method import PromptLearning

__all__ = ["ModelSizes", "PromptLearning", "PromptLearningConfig", "VirtualTokenEncoder", "model_sizes"]

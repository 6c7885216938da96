"""Prefix tuning (Li & Liang 2021): trained keys and values in front of every attention layer."""

from petune.methods.prefix_tuning.config import PrefixTuningConfig
from petune.methods.prefix_tuning.model import PrefixEncoder, PrefixTuning
from petune.methods.prompt_learning.cache import PrefixCache

__all__ = ["PrefixCache", "PrefixEncoder", "PrefixTuning", "PrefixTuningConfig"]

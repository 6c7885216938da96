"""Prefix tuning (Li & Liang 2021): trained keys and values in front of every attention layer."""

from petune.methods.prefix_tuning.cache import PrefixCache
from petune.methods.prefix_tuning.config import PrefixTuningConfig
from petune.methods.prefix_tuning.model import PrefixEncoder, PrefixTuning

__all__ = ["PrefixCache", "PrefixEncoder", "PrefixTuning", "PrefixTuningConfig"]

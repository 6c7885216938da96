"""LN tuning (Zhao et al. 2024): train only the normalisation layers."""

from petune.methods.ln_tuning.config import LNTuningConfig
from petune.methods.ln_tuning.layer import LNTuningLayer
from petune.methods.ln_tuning.model import LNTuning

__all__ = ["LNTuning", "LNTuningConfig", "LNTuningLayer"]

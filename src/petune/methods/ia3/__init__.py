"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations."""

from petune.methods.ia3.config import IA3Config
from petune.methods.ia3.layer import IA3Layer
from petune.methods.ia3.model import IA3

__all__ = ["IA3", "IA3Config", "IA3Layer"]

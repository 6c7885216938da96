"""LoHa (Hyeon-Woo et al. 2022): a low-rank Hadamard product update."""

from petune.methods.loha.config import LoHaConfig
from petune.methods.loha.layer import LoHaAdapter, LoHaLayer
from petune.methods.loha.model import LoHa

__all__ = ["LoHa", "LoHaAdapter", "LoHaConfig", "LoHaLayer"]

"""BOFT (Liu et al. 2024): orthogonal fine-tuning with butterfly-factorised rotations and an output scale."""

from petune.methods.boft.config import BOFTConfig
from petune.methods.boft.layer import BOFTAdapter, BOFTLayer
from petune.methods.boft.model import BOFT

__all__ = ["BOFT", "BOFTAdapter", "BOFTConfig", "BOFTLayer"]

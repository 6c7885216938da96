"""OFT (Qiu et al. 2023): a block-diagonal orthogonal rotation of each adapted layer's input."""

from petune.methods.oft.config import OFTConfig
from petune.methods.oft.layer import OFTAdapter, OFTLayer
from petune.methods.oft.model import OFT

__all__ = ["OFT", "OFTAdapter", "OFTConfig", "OFTLayer"]

"""FourierFT (Gao et al. 2024): a weight update learned as a few Fourier coefficients."""

from petune.methods.fourierft.config import FourierFTConfig
from petune.methods.fourierft.layer import FourierFTAdapter, FourierFTLayer
from petune.methods.fourierft.model import FourierFT

__all__ = ["FourierFT", "FourierFTAdapter", "FourierFTConfig", "FourierFTLayer"]

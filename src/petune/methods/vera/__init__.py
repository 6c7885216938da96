"""VeRA (Kopiczko et al. 2024): trained scaling vectors around shared frozen random matrices."""

from petune.methods.vera.config import VeraConfig
from petune.methods.vera.layer import VeraAdapter, VeraLayer, VeraProjection
from petune.methods.vera.model import Vera

__all__ = ["Vera", "VeraAdapter", "VeraConfig", "VeraLayer", "VeraProjection"]

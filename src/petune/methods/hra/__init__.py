"""HRA (Yuan et al. 2024): a chain of Householder reflections multiplied into each weight."""

from petune.methods.hra.config import HRAConfig
from petune.methods.hra.layer import HRAAdapter, HRALayer
from petune.methods.hra.model import HRA

__all__ = ["HRA", "HRAAdapter", "HRAConfig", "HRALayer"]

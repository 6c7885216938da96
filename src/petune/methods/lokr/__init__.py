"""LoKr (Yeh et al. 2023, LyCORIS): a Kronecker-product update."""

from petune.methods.lokr.config import LoKrConfig
from petune.methods.lokr.layer import LoKrAdapter, LoKrLayer, factorization
from petune.methods.lokr.model import LoKr

__all__ = ["LoKr", "LoKrAdapter", "LoKrConfig", "LoKrLayer", "factorization"]

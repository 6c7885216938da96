"""AdaLoRA (Zhang et al. 2023): SVD-shaped low-rank updates whose rank budget moves to the layers that need it."""

from petune.methods.adalora.allocator import RankAllocator
from petune.methods.adalora.config import AdaLoraConfig
from petune.methods.adalora.layer import AdaLoraLayer, SVDAdapter
from petune.methods.adalora.model import AdaLora

__all__ = ["AdaLora", "AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "SVDAdapter"]

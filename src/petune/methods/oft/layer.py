"""The OFT layer: a frozen linear layer whose input is rotated block by block before it."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from petune.factors import nearest_divisor
from petune.methods.oft.config import OFTConfig
from petune.methods.orthogonal import (
    block_diagonal,
    cayley,
    cayley_neumann,
    drop_blocks,
    rotate_blocks,
    skew_from_upper,
)
from petune.methods.weight_layer import WeightLayer


class BlockRotations(nn.Module):
    """HF PEFT's `oft_R`: `weight` (stored blocks, b (b - 1) / 2), each row a skew-symmetric b x b matrix's upper
    triangle, and the orthogonal blocks made from them."""

    def __init__(self, stored_blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.block_size = block_size
        self.exact = not config.use_cayley_neumann
        self.terms = config.num_cayley_neumann_terms
        self.coft_eps = config.eps if config.coft else None
        self.weight = nn.Parameter(torch.zeros(stored_blocks, block_size * (block_size - 1) // 2))
        if not config.init_weights:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks (stored blocks, b, b); COFT first pulls each skew matrix back into its ball."""
        if self.coft_eps is not None:
            with torch.no_grad():
                self.weight.copy_(constrain(self.weight, self.coft_eps))
        skew = skew_from_upper(self.weight, self.block_size)
        return cayley(skew) if self.exact else cayley_neumann(skew, self.terms)


def constrain(upper: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT's projection: each skew matrix with Frobenius norm (sqrt 2 |row|) above eps / sqrt(rows) scaled to it."""
    radius = eps / math.sqrt(upper.shape[0])
    norm = math.sqrt(2) * upper.norm(dim=1, keepdim=True)
    return torch.where(norm <= radius, upper, upper * radius / norm)


class OFTAdapter(nn.Module):
    """One layer's `oft_R` over `blocks` blocks of size b (one shared block with `block_share`)."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.blocks = blocks
        self.dropout = config.module_dropout
        self.oft_R = BlockRotations(1 if config.block_share else blocks, block_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x R for x (..., in), in the adapter's dtype."""
        rotations = self.oft_R.rotations()
        if self.training and self.dropout > 0:
            rotations = drop_blocks(rotations.unsqueeze(0), self.dropout)[0]
        return rotate_blocks(x.to(rotations.dtype), rotations)

    def matrix(self, inverse: bool = False) -> torch.Tensor:
        """R (in, in), block diagonal; `inverse`: R^-1 (the Neumann form is only nearly orthogonal)."""
        rotations = self.oft_R.rotations()
        if inverse:
            rotations = torch.linalg.inv(rotations.float())
        return block_diagonal(rotations, self.blocks)


class OFTLayer(WeightLayer):
    """An `nn.Linear` whose input is rotated: y = (x R) W^T + b, merged as W <- W R^T."""

    def add(self, name: str, config: OFTConfig, module_name: str) -> None:
        in_features = self.in_features
        if config.r == 0:
            block_size = adjusted(config.oft_block_size, in_features, "oft_block_size", module_name)
            blocks = in_features // block_size
        else:
            blocks = adjusted(config.r, in_features, "r", module_name)
            block_size = in_features // blocks
        adapter = OFTAdapter(blocks, block_size, config)
        self.adapters[name] = adapter.to(self.base_layer.weight.device)  # type: ignore[arg-type]

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.check_merged(name) or name is None:
            return self.base_layer(x, *args, **kwargs)
        rotated = self.adapters[name](x)
        result: torch.Tensor = self.base_layer(rotated.to(x.dtype), *args, **kwargs)
        return result.to(x.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """W <- W R^T."""
        rotation = self.adapters[name].matrix()  # type: ignore[operator]
        self.write_merged(name, self.base_weight().float() @ rotation.float().T, safe_merge)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W (R^-1)^T, most recent first."""
        while self.merged:
            inverse = self.adapters[self.merged.pop()].matrix(inverse=True)  # type: ignore[operator]
            self._set_base_weight(self.base_weight().float() @ inverse.float().T)


def adjusted(value: int, in_features: int, field: str, module_name: str) -> int:
    """`value` if it divides `in_features`, else the nearest divisor, with a warning."""
    nearest = nearest_divisor(in_features, value)
    if nearest != value:
        warnings.warn(
            f"OFTConfig.{field}={value} does not divide {module_name}'s input size {in_features}; using {nearest}",
            stacklevel=6,
        )
    return nearest

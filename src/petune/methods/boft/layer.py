"""The BOFT layer: the input rotated by a product of butterfly-permuted block-diagonal orthogonal matrices,
the output scaled per row."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.methods.boft.config import BOFTConfig
from petune.methods.orthogonal import cayley, drop_blocks, rotate_blocks
from petune.methods.weight_layer import WeightLayer


def butterfly_permutation(size: int, block_size: int, factor: int) -> torch.Tensor:
    """P_i as indices (position j of P x reads x[idx[j]]): factor 0 is the identity; factor i cuts each group of
    b 2^i inputs into half blocks and puts the even-numbered ones first, so the next block-diagonal matrix mixes
    halves of blocks that were 2^(i-1) apart (Liu et al. 2024, figure 3)."""
    if factor == 0:
        return torch.arange(size)
    half, group = block_size // 2, block_size * 2**factor
    chunks = group // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, size, group)])


class BOFTAdapter(nn.Module):
    """`boft_R` (m factors, D blocks, b, b), read as skew-symmetric through (R - R^T) / 2, and `boft_s` (out, 1):
    HF PEFT's names and shapes."""

    def __init__(self, sizes: tuple[int, int, int], in_features: int, out_features: int, config: BOFTConfig) -> None:
        super().__init__()
        factors, blocks, block_size = sizes
        self.in_features: int = in_features
        self.dropout = config.boft_dropout
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        for i in range(factors):
            index = butterfly_permutation(in_features, block_size, i)
            self.register_buffer(f"gather_{i}", index, persistent=False)
            self.register_buffer(f"scatter_{i}", torch.argsort(index), persistent=False)

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks (m, D, b, b)."""
        factors, blocks, size, _ = self.boft_R.shape
        upper = self.boft_R.reshape(factors * blocks, size, size)
        return cayley(0.5 * (upper - upper.transpose(1, 2))).reshape(self.boft_R.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x M for x (..., in), with dropout in training.

        M is formed (in, in) and applied as one matmul, as HF PEFT does: applying the factors block by block
        costs less but rounds differently, and over 30 layers that moves logits past 1e-5 from peft's.
        """
        rotations = self.rotations()
        if self.training and self.dropout > 0:
            rotations = drop_blocks(rotations, self.dropout)
        return x @ self.factor_product(rotations).to(x.dtype)

    def factor_product(self, rotations: torch.Tensor) -> torch.Tensor:
        """M = M_m ... M_1 (in, in), built row by row from I: x M_i = ((x P_i) diag(R_i)) P_i^T."""
        x = torch.eye(self.in_features, device=rotations.device, dtype=rotations.dtype)
        for i in reversed(range(rotations.shape[0])):
            x = rotate_blocks(x[..., getattr(self, f"scatter_{i}")], rotations[i])[..., getattr(self, f"gather_{i}")]
        return x

    def matrix(self) -> torch.Tensor:
        """M (in, in)."""
        return self.factor_product(self.rotations())


class BOFTLayer(WeightLayer):
    """An `nn.Linear` with BOFT adapters: y = s * ((x M) W^T) + b, merged as W <- s * (W M^T)."""

    def add(self, name: str, config: BOFTConfig, module_name: str) -> None:
        sizes = boft_sizes(config, self.in_features, module_name)
        adapter = BOFTAdapter(sizes, self.in_features, self.out_features, config)
        self.adapters[name] = adapter.to(self.base_layer.weight.device)  # type: ignore[arg-type]

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.check_merged(name) or name is None:
            return self.base_layer(x, *args, **kwargs)
        adapter: BOFTAdapter = self.adapters[name]  # type: ignore[assignment]
        rotated = adapter(x.to(adapter.boft_R.dtype)).to(x.dtype)
        result: torch.Tensor = self.base_layer(rotated, *args, **kwargs)
        bias: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        if bias is None:
            return (result * adapter.boft_s.squeeze(-1)).to(x.dtype)
        return ((result - bias) * adapter.boft_s.squeeze(-1) + bias).to(x.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """W <- s * (W M^T)."""
        adapter: BOFTAdapter = self.adapters[name]  # type: ignore[assignment]
        merged = (self.base_weight().float() @ adapter.matrix().float().T) * adapter.boft_s.float()
        self.write_merged(name, merged, safe_merge)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- (W / s) M (M is orthogonal), most recent first."""
        while self.merged:
            adapter: BOFTAdapter = self.adapters[self.merged.pop()]  # type: ignore[assignment]
            weight = (self.base_weight().float() / adapter.boft_s.float()) @ adapter.matrix().float()
            self._set_base_weight(weight)


def boft_sizes(config: BOFTConfig, in_features: int, module_name: str) -> tuple[int, int, int]:
    """(factors m, blocks D, block size b) for a layer with `in_features` inputs, or an error naming the layer."""
    factors = config.boft_n_butterfly_factor
    given = "boft_block_size" if config.boft_block_size else "boft_block_num"
    value = config.boft_block_size or config.boft_block_num
    if in_features % value:
        raise ValueError(
            f"BOFTConfig.{given}={value} does not divide the input size {in_features} of {module_name}; choose a "
            f"divisor of it, or exclude the layer"
        )
    size = value if config.boft_block_size else in_features // value
    blocks = in_features // size
    span = size * 2 ** (factors - 1)  # the inputs one butterfly group mixes
    if factors > 1 and (size % 2 or in_features % span):
        raise ValueError(
            f"BOFTConfig.boft_n_butterfly_factor={factors} needs an even block size whose 2^{factors - 1} multiple "
            f"({span}) divides the input size {in_features} of {module_name}; got block size {size}: use fewer "
            f"factors or another block size"
        )
    return factors, blocks, size

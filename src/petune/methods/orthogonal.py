"""Orthogonal blocks for OFT and BOFT: the Cayley transform, blockwise rotation of inputs, block dropout.

Both methods (Qiu et al. 2023; Liu et al. 2024) multiply a frozen weight by an orthogonal matrix built from
small b x b blocks R_i = Cayley(Q_i) of skew-symmetric Q_i, so a layer's input is rotated block by block.
"""

from __future__ import annotations

import torch


def skew_from_upper(upper: torch.Tensor, size: int) -> torch.Tensor:
    """Skew-symmetric matrices (n, size, size) from their strict upper triangles `upper` (n, size (size - 1) / 2),
    read row by row."""
    rows, cols = torch.triu_indices(size, size, 1, device=upper.device)
    skew = upper.new_zeros(upper.shape[0], size, size)
    skew[:, rows, cols] = upper
    return skew - skew.transpose(1, 2)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """The Cayley transform (I - Q)(I + Q)^-1 of skew-symmetric Q (n, b, b): orthogonal, I at Q = 0 (OFT, eq. 4)."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 with the inverse as a truncated Neumann series: I + 2Q + ... + 2Q^m + Q^(m+1).

    No matrix inverse, only `terms` - 2 matmuls (Qiu et al. 2025, "Orthogonal finetuning made scalable"); close
    to orthogonal while Q is small. m = terms - 2 as HF PEFT 0.21 computes it (m = 2 when terms = 3), so files
    agree; terms 1 and 2 give I and I + 2Q.
    """
    result = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms < 2:
        return result
    result = result + 2 * skew
    if terms < 3:
        return result
    highest = max(terms - 2, 2)
    power = skew
    for _ in range(2, highest + 1):
        power = power @ skew
        result = result + 2 * power
    return result + power @ skew


def rotate_blocks(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x (..., n b) with block i of its last dimension multiplied by rotations[i] (b, b) on the right:
    x R for the block-diagonal R = diag(rotations) (n, b, b); one shared block (1, b, b) serves every block."""
    block = rotations.shape[-1]
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    if rotations.shape[0] == 1:
        return (blocks @ rotations[0]).reshape(x.shape)
    return torch.einsum("...nk,nkc->...nc", blocks, rotations).reshape(x.shape)


def block_diagonal(rotations: torch.Tensor, count: int) -> torch.Tensor:
    """The (count b, count b) block-diagonal matrix of `rotations` (n, b, b); n = 1 repeats the one block."""
    blocks = rotations.expand(count, -1, -1) if rotations.shape[0] == 1 else rotations
    return torch.block_diag(*blocks.unbind(0))


def drop_blocks(rotations: torch.Tensor, probability: float) -> torch.Tensor:
    """Multiplicative dropout (OFT, section 4): int(p D) of the D blocks of one randomly chosen stack, set to I.

    `rotations` is (N, D, b, b), N stacks of D blocks (BOFT's butterfly factors; OFT has N = 1). A dropped
    block leaves its slice of the input unrotated, the orthogonal analogue of dropping a LoRA path.
    """
    stacks, count, size = rotations.shape[0], rotations.shape[1], rotations.shape[-1]
    dropped = int(probability * count)
    if count == 1 or dropped == 0:
        return rotations
    mask = torch.zeros(stacks, count, 1, 1, device=rotations.device, dtype=rotations.dtype)
    chosen = torch.randperm(count, device=rotations.device)[:dropped]
    mask[int(torch.randint(stacks, (1,))), chosen] = 1
    eye = torch.eye(size, device=rotations.device, dtype=rotations.dtype)
    return (1 - mask) * rotations + mask * eye

"""Rules that merge several task tensors into one: task arithmetic, TIES, DARE, magnitude pruning.

Each rule takes `tensors`, a list of same-shaped tensors (one per adapter), and `weights` (n_adapters,)
and returns one tensor of that shape. They follow HF PEFT 0.21's definitions, so `add_weighted_adapter`
combines adapters as peft does:

- task arithmetic (Ilharco et al. 2023): sum_i w_i t_i.
- magnitude pruning: each t_i keeps its `density` fraction of largest-|.| entries, then task arithmetic.
- TIES (Yadav et al. 2023): magnitude pruning, then per entry only the tensors whose sign agrees with
  the elected sign contribute, averaged over how many contribute ("disjoint merge").
- DARE (Yu et al. 2024): each entry of t_i is kept with probability `density` and rescaled by 1/density
  (drawn with `torch.bernoulli`, so `torch.manual_seed` makes it repeatable), then task arithmetic
  (`dare_linear`) or TIES' sign election and disjoint merge (`dare_ties`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i over dim 0 of `stacked` (n, ...)."""
    return (stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


def check_density(density: float | None, rule: str) -> float:
    """`density` as a float, or a clear error: the pruning rules need a fraction to keep."""
    if density is None:
        raise ValueError(f"combination_type={rule!r} prunes: pass density=<fraction to keep, in (0, 1]>")
    if density < 0:
        raise ValueError(f"density must be >= 0 (the fraction of entries kept), got {density}")
    return density


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    flat_keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    flat_keep[top.indices] = 1
    return tensor * flat_keep.reshape(tensor.shape)


def drop_and_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's random drop: each entry kept with probability `density`, the kept ones divided by `density`."""
    if density >= 1:
        return tensor
    kept = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * kept / density


def elected_sign_mask(stacked: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """TIES' sign election: True where t_i's sign equals the entry's elected sign, shape of `stacked` (n, ...).

    `"total"` elects the sign of sum_i t_i (mass), `"frequency"` the sign most tensors have; ties go to +.
    """
    signs = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return signs == torch.where(score >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none do)."""
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _pruned(tensors: list[torch.Tensor], prune: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([prune(t) for t in tensors], dim=0)


def combine(
    rule: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    sign_method: SignMethod,
) -> torch.Tensor:
    """Merge `tensors` with `weights` (n,) by `rule`: linear/svd, ties, dare_linear, dare_ties, magnitude_prune."""
    rule = rule.removesuffix("_svd")
    if rule in ("linear", "svd"):
        return weighted_sum(torch.stack(tensors, dim=0), weights)
    fraction = check_density(density, rule)
    if fraction >= 1:
        warnings.warn(f"density={fraction} >= 1: no entry is pruned", stacklevel=4)
    if rule == "magnitude_prune":
        return weighted_sum(_pruned(tensors, lambda t: keep_largest(t, fraction)), weights)
    if rule == "dare_linear":
        return weighted_sum(_pruned(tensors, lambda t: drop_and_rescale(t, fraction)), weights)
    if rule in ("ties", "dare_ties"):
        prune = keep_largest if rule == "ties" else drop_and_rescale
        stacked = _pruned(tensors, lambda t: prune(t, fraction))
        agree = elected_sign_mask(stacked, sign_method)
        return disjoint_mean(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), agree)
    raise ValueError(f"unknown combination rule {rule!r}")
